"""An encode run that kills itself with SIGKILL after its second commit of finished clips, for the kill -9 test
(run as a subprocess):

    python tests/encode_crash_helpers.py DATA OUTPUT RAY_ADDRESS
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


class DyingCommitter:
    """Mixed into pipelines.encode.EncodeCommitter: dies after its second commit of finished clips."""

    commits = 0

    def flush(self) -> None:
        had = bool(self.ready)
        super().flush()
        if had:
            DyingCommitter.commits += 1
            if DyingCommitter.commits == 2:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    data, output, address = sys.argv[1:4]
    from test_encode import ENCODE_SETS

    from pipelines import encode
    from pipelines.config import load_config
    from training.latent_encode import EncodeConfig

    encode.EncodeCommitter = type("EncodeCommitter", (DyingCommitter, encode.EncodeCommitter), {})
    config = load_config(EncodeConfig, None, [*ENCODE_SETS, f"ray.address={address}"],
                         base={"data": data, "output": output})
    encode.run_encode(config)
    raise SystemExit("the second commit was never reached")


if __name__ == "__main__":
    main()
