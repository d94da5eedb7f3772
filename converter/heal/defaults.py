"""The heal command's choices and defaults, importable without torch (the CLI builds --help
from them; HealOptions uses the same values)."""

TRAIN_CHOICES = ("attention", "all")  # weights trained: attention only, or every weight
# matmul precision of the training steps: auto = bf16 on a GPU and on a CPU with AMX tiles
PRECISIONS = ("auto", "fp32", "bf16")
SEQLEN = 512
# one 512-token sequence per step, a step of 1e-3 of each tensor's RMS: on SmolLM2 at 128 KV
# elements (32k tokens of the comedies) test PPL 32.84 -> 31.69, against 31.95 at 5e-4 and 31.80
# at 2e-3 (which first climbs away from the teacher); 4e-3 and above never beat the input
# (docs/heal.md, "Settings")
BATCH_SIZE = 1
LR = 1e-3
