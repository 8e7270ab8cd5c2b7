"""The ``gridqueue`` command on fake GPUs: ``python -m tests.fakes.nvml_gridqueue worker ...``
runs a real worker whose NVML is the fake that ``$FAKE_NVML_SPEC`` describes (JSON, see
``fake_from_spec``). Tests use it to run a worker with ``--probe nvml`` on a machine
without a GPU."""

from __future__ import annotations

from gridqueue.cli import main
from tests.fakes.fake_nvml import SPEC_ENV, install_from_env

if __name__ == "__main__":
    if install_from_env() is None:
        raise SystemExit(f"set {SPEC_ENV} to the fake's JSON spec")
    main()
