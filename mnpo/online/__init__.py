"""Online NLHF: `train-egpo` (EGPO, Online IPO 1/2, Nash-MD, Nash-MD-PG), sampling and judging inside the step."""
