"""Config files: `--config configs/<name>.py` (get_config()); installed so that they import base."""
