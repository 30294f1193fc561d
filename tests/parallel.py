"""`make test`: the suite in two pytest processes at once.

The tests that stop, pause or kill servers run against private instances of them
(tests/private.py) and spend most of their time waiting for those servers to go down and come
back; the rest use the machine's shared services. The two groups share nothing, so they run
side by side: the shared group's output is shown as it runs, the private group's after it,
and the run fails if either does. With arguments (`make test PYTEST_ARGS="-k name -x"`) it is
one plain pytest run.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest

PRIVATE = "private"


def main(args: list[str]) -> int:
    if args:
        return int(pytest.main(args))
    with tempfile.TemporaryFile() as log:
        private = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-m", PRIVATE, "-p", "no:cacheprovider"],
            stdout=log, stderr=subprocess.STDOUT)
        shared = subprocess.run([sys.executable, "-m", "pytest", "-m", f"not {PRIVATE}"],
                                check=False)
        private.wait()
        log.seek(0)
        print("\n---- tests with private servers (tests/private.py) ----", flush=True)
        sys.stdout.buffer.write(log.read())
        sys.stdout.flush()
    return 0 if shared.returncode == private.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
