"""Column and file names shared by the stage that writes them and the stage that reads them."""

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

# Precomputed opponents (mnpo precompute -> mnpo train-mnpo). Each scored model writes the pair
# <model>_chosen_logps, <model>_rejected_logps; precompute.json names the model by <model>.
REFERENCE_MODEL = "reference"
REFERENCE_CHOSEN_LOGPS = "reference_chosen_logps"
REFERENCE_REJECTED_LOGPS = "reference_rejected_logps"
# Token ids precompute scored, stored so train-mnpo scores exactly the same tokens.
PROMPT_INPUT_IDS = "prompt_input_ids"
CHOSEN_INPUT_IDS = "chosen_input_ids"  # completion ids only (the prompt is PROMPT_INPUT_IDS)
REJECTED_INPUT_IDS = "rejected_input_ids"
TOKEN_ID_COLUMNS = (PROMPT_INPUT_IDS, CHOSEN_INPUT_IDS, REJECTED_INPUT_IDS)
# Files precompute writes into its output folder.
PRECOMPUTE_METADATA_FILE = "precompute.json"  # tokenisation fingerprint, reduction, scored models
PRECOMPUTE_CACHE_DIR = ".precompute_cache"  # one finished model's log-probs per file, for reruns
TOKENIZATION_FINGERPRINT = "tokenization_fingerprint"  # key in PRECOMPUTE_METADATA_FILE


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


def history_model(j: int) -> str:
    """Name of history model j (0 = most recent opponent, pi_t) in its columns and in precompute.json."""
    return f"history{j}"


def chosen_logps(model: str) -> str:
    """Column of `model`'s (REFERENCE_MODEL or history_model(j)) log-probs of the chosen response."""
    return f"{model}_chosen_logps"


def rejected_logps(model: str) -> str:
    return f"{model}_rejected_logps"


def history_chosen_logps(j: int) -> str:
    return chosen_logps(history_model(j))


def history_rejected_logps(j: int) -> str:
    return rejected_logps(history_model(j))


def count_history_columns(column_names: list[str]) -> int:
    """Number of consecutive history{j}_{chosen,rejected}_logps column pairs, j = 0, 1, ..."""
    j = 0
    while history_chosen_logps(j) in column_names and history_rejected_logps(j) in column_names:
        j += 1
    return j


def chat_pair(prompt: str, response: str) -> list[dict[str, str]]:
    """The chat-message list stored in `chosen` / `rejected`."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
