"""Phone recognition in a render helper, beside the recognition in this process.

pocketsphinx holds the interpreter lock while it decodes, so two halves of a recording
recognised in two threads take as long as the whole. `audio_features.encode_audio` cuts a long
recording in a pause and hands its second half to `second_half`'s `start`; that half goes to one
of the render pool's helper processes (borrowed through `RenderPool.lend`, so it is never shared
with a render), while this process recognises the first half.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np

from .audio_features import PhonesFuture
from .errors import PipelineError
from .render_messages import Answer, Failed, Phones, RecognisePhones
from .render_pool import HelperLine, RenderPool


class PhonesPool:
    """Recognises phones in a render helper of `pool`."""

    def __init__(self, pool: RenderPool):
        self.pool = pool

    @contextlib.contextmanager
    def second_half(self) -> Iterator[Callable[[np.ndarray], PhonesFuture | None]]:
        """Yields `start(waveform)`, which hands a waveform (N,) float32 at media.SAMPLE_RATE to a
        helper's recogniser and returns a future whose `result()` gives its timed phones; or None
        when the helpers are busy with another request (the caller then recognises everything
        itself). An answer not read by the end is read on leaving, so the helper stays in step."""
        with self.pool.lend() as line:
            if line is None:
                yield lambda wav: None
            else:
                yield lambda wav: HelperPhones(line, wav)


class HelperPhones:
    """Timed phones of one waveform, being recognised by a helper (a PhonesFuture)."""

    def __init__(self, line: HelperLine, wav: np.ndarray):
        line.send(RecognisePhones(np.asarray(wav, np.float32)))
        self._line = line
        self._answer: Answer | None = None

    def result(self) -> list[tuple[str, float, float]]:
        """[(ARPAbet phone, start_s, end_s), ...], times from the waveform's start; waits for the
        helper. PipelineError when recognition failed there or the helper was lost."""
        if self._answer is None:
            self._answer = self._line.receive()
        if isinstance(self._answer, Failed):
            raise PipelineError(f"phone recognition failed: {self._answer.error}")
        assert isinstance(self._answer, Phones)  # a helper answers RecognisePhones with Phones or Failed
        return self._answer.phones
