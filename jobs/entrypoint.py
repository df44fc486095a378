"""What a submitted Ray job runs: one `distill-ray` stage with the config the submitter resolved."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill_ray.cli import main  # noqa: E402
from distill_ray.submit import CONFIG_ENV_VAR  # noqa: E402

if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else "run"
    payload = os.environ.get(CONFIG_ENV_VAR)
    if not payload:
        sys.exit(f"{CONFIG_ENV_VAR} is not set: submit jobs with `distill-ray submit`")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(json.loads(payload), f)  # JSON is YAML
    sys.exit(main([stage, "-c", f.name, *sys.argv[2:]]))
