"""Publishing converted checkpoints to the Hugging Face Hub: validate, then upload.

``push_folder`` is what ``python -m converter upload`` and ``--push-to-hub`` call;
``validate_folder`` is the pre-upload check; ``resolve_token`` fails fast before a long run.
"""

from converter.hub.upload import push_folder, resolve_token
from converter.hub.validate import validate_folder

__all__ = ["push_folder", "resolve_token", "validate_folder"]
