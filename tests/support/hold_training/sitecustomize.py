"""Holds a trainer subprocess after a given step, for tests that kill a run mid-way.

Put this folder first on a subprocess's PYTHONPATH and set ``HOLD_TRAINING_AFTER_STEP=N``:
once optimizer step N+1 ends, the training loop waits forever (checkpoints up to step N
are saved, background uploads go on). A test can then kill the run at a point it chose
instead of racing a tiny model that may finish before it is killed.
"""

from __future__ import annotations

import os
import time

_HOLD_AFTER = os.environ.get("HOLD_TRAINING_AFTER_STEP")

if _HOLD_AFTER:
    from typing import Any

    from transformers import trainer_callback

    _original = trainer_callback.CallbackHandler.on_step_end
    _limit = int(_HOLD_AFTER)

    def _on_step_end(self: Any, args: Any, state: Any, control: Any) -> Any:
        # Saving for step N happens after on_step_end(N), so hold at step N+1.
        while state.global_step > _limit:
            time.sleep(1)
        return _original(self, args, state, control)

    trainer_callback.CallbackHandler.on_step_end = _on_step_end  # type: ignore[method-assign]
