"""Column names shared by the stage that writes them and the stage that reads them."""

# Preference data, in the schema of princeton-nlp/gemma2-ultrafeedback-armorm.
PROMPT = "prompt"  # str: the user turn
CHOSEN = "chosen"  # list[{"role", "content"}]: user turn + preferred assistant turn
REJECTED = "rejected"  # list[{"role", "content"}]: user turn + dispreferred assistant turn
ALL_RESPONSES = "all_generated_responses"  # list[str]: the K sampled responses
ALL_RM_SCORES = "all_rm_scores"  # list[float]: one score per response (the labelling RM)
PROMPT_ID = "prompt_id"  # str: stable id of a prompt across stages
# Per-response win rates (mnpo annotate -> train-mnpo --loss_type sppo): P(y > the other K - 1 responses).
ALL_WIN_RATES = "all_win_rates"  # list[float | None]: one per response, from the labelling judge
CHOSEN_WIN_RATE = "chosen_win_rate"  # float: the chosen response's entry of all_win_rates
REJECTED_WIN_RATE = "rejected_win_rate"  # float: the rejected response's entry

# Precomputed opponents (mnpo precompute -> mnpo train-mnpo).
REFERENCE_CHOSEN_LOGPS = "reference_chosen_logps"
REFERENCE_REJECTED_LOGPS = "reference_rejected_logps"


# The opponents each `--loss_type` of train-mnpo trains against (MNPO paper Table 1): precompute scores
# only these models. "pi_t" is history0, the policy this iteration starts from.
LOSS_OPPONENTS = {
    "mnpo": ("reference", "history"),
    "ipo": ("reference",),
    "inpo": ("reference", "pi_t"),
    "dpo": ("reference",),
    "simpo": (),
    "sppo": ("pi_t",),
    "dno": ("pi_t",),
}
LOSS_TYPES = tuple(LOSS_OPPONENTS)


def history_chosen_logps(j: int) -> str:
    """Column of history model j (0 = most recent opponent) log-probs of the chosen response."""
    return f"history{j}_chosen_logps"


def history_rejected_logps(j: int) -> str:
    return f"history{j}_rejected_logps"


def chat_pair(prompt: str, response: str) -> list[dict[str, str]]:
    """The chat-message list stored in `chosen` / `rejected`."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
