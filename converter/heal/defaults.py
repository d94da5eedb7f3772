"""The heal command's choices and defaults, importable without torch (the CLI builds --help
from them; HealOptions uses the same values)."""

TRAIN_CHOICES = ("attention", "all")  # weights trained: attention only, or every weight
# matmul precision of the training steps: auto = bf16 on a GPU and on a CPU with AMX tiles
PRECISIONS = ("auto", "fp32", "bf16")
SEQLEN = 512
# one 512-token sequence per step at 3e-4: on SmolLM2 at 128 KV elements (32k tokens, same
# throughput per token on 2 cores) 33.8 held-out PPL, against 34.6 for 4 per step at 3e-4
# (docs/heal.md, "Settings"); 1e-3 diverges at 4 per step
BATCH_SIZE = 1
LR = 3e-4
