"""One worker's render calls on the real tiny FLUX: turns, shared batches, and their ends."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from serve_app.generation.pipeline import FluxGenerator, RenderedImage
from serve_app.generation.planning import SamplingJob
from serve_app.generation.scheduling import RenderScheduler, round_robin
from serve_app.inputs.pixels import RenderInputs
from serve_app.schemas import SamplingParams

from .images import mean_abs_difference

BASE = SamplingParams(sampler="euler", steps=2, cfg_scale=1.0, seed=1, width=64, height=64)


def job(index: int, prompt: str = "a red cat", **changes: object) -> SamplingJob:
    params = BASE.model_copy(update={"seed": 100 + index, **changes})
    return SamplingJob(index=index, prompt=prompt, negative_prompt=None, params=params)


class RecordingGenerator:
    """The real generator, recording the jobs of each pipeline call; a call can be held at a gate
    until the test opens it."""

    def __init__(self, generator: FluxGenerator) -> None:
        self.generator = generator
        self.sampled: list[list[tuple[str, int]]] = []
        self.gates: dict[int, threading.Event] = {}
        self.reached: dict[int, threading.Event] = {}
        self.fail_prompt: str | None = None
        self.fail_stage = "sample"
        self.interrupted: list[bool] = []
        """Whether each pipeline call was stopped before its last step."""

    def hold(self, call_number: int) -> tuple[threading.Event, threading.Event]:
        """Hold pipeline call ``call_number`` (0-based): (reached, gate)."""
        self.reached[call_number] = threading.Event()
        self.gates[call_number] = threading.Event()
        return self.reached[call_number], self.gates[call_number]

    def sample(
        self,
        batch: list[SamplingJob],
        cancelled: threading.Event | None = None,
        inputs: RenderInputs | None = None,
    ) -> Any:
        number = len(self.sampled)
        self.sampled.append([(job.prompt, job.index) for job in batch])
        if number in self.gates:
            self.reached[number].set()
            assert self.gates[number].wait(30), "the test never opened the gate"
        self._maybe_fail("sample", batch)
        try:
            return self.generator.sample(batch, cancelled, inputs)
        finally:
            self.interrupted.append(self.generator.pipeline.interrupt)

    def encode(self, batch: list[SamplingJob], images: list[Any]) -> list[RenderedImage]:
        self._maybe_fail("encode", batch)
        return self.generator.encode(batch, images)

    def _maybe_fail(self, stage: str, batch: list[SamplingJob]) -> None:
        if stage == self.fail_stage and any(job.prompt == self.fail_prompt for job in batch):
            raise RuntimeError(f"{stage}: CUDA error: an illegal memory access was encountered")


@pytest.fixture
def recording(generator: FluxGenerator) -> RecordingGenerator:
    return RecordingGenerator(generator)


def scheduler_on(
    recording: RecordingGenerator, max_batch_size: int = 2, across_calls: bool = True
) -> RenderScheduler:
    return RenderScheduler(recording, max_batch_size=max_batch_size, across_calls=across_calls)


async def collect(scheduler: RenderScheduler, jobs: list[SamplingJob]) -> list[list[int]]:
    """The job indexes of each group a call receives, in order."""
    return [[image.job.index for image in group] async for group in scheduler.render(jobs)]


async def until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 30), "never happened"


def test_round_robin_takes_from_each_queue_in_turn() -> None:
    a, b, c = ([job(i, prompt=p) for i in range(n)] for p, n in (("a", 3), ("b", 1), ("c", 2)))
    taken = [(number, sampling_job.index) for number, sampling_job in round_robin([a, b, c], 5)]
    assert taken == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1)]
    assert round_robin([a, b], 0) == []


def test_one_call_is_batched_by_parameters_in_job_order(recording: RecordingGenerator) -> None:
    scheduler = scheduler_on(recording)
    jobs = [job(0), job(1, steps=1), job(2), job(3), job(4)]

    async def scenario() -> None:
        assert await collect(scheduler, jobs) == [[0, 2], [1], [3, 4]]

    asyncio.run(scenario())
    assert [[index for _, index in call] for call in recording.sampled] == [[0, 2], [1], [3, 4]]


def test_a_call_that_arrives_mid_call_leads_the_next_batch(recording: RecordingGenerator) -> None:
    scheduler = scheduler_on(recording)
    long_call = [job(i, prompt="long") for i in range(8)]
    # Other parameters, so it can't share the long call's batches: it has to get a turn.
    short_call = [job(i, prompt="short", steps=1) for i in range(2)]
    reached, gate = recording.hold(1)

    async def scenario() -> None:
        long_task = asyncio.create_task(collect(scheduler, long_call))
        await until(reached)  # the long call's second batch is sampling
        short_task = asyncio.create_task(collect(scheduler, short_call))
        await asyncio.sleep(0)  # let the short call register
        gate.set()
        assert await short_task == [[0, 1]]
        assert await long_task == [[0, 1], [2, 3], [4, 5], [6, 7]]

    asyncio.run(scenario())
    leads = [call[0][0] for call in recording.sampled]
    assert leads == ["long", "long", "short", "long", "long"]


@pytest.mark.parametrize(
    ("across_calls", "expected"),
    [
        pytest.param(True, [[("a", 0), ("b", 0), ("a", 1), ("b", 1)], [("a", 2)]], id="shared"),
        pytest.param(False, [[("a", 0), ("a", 1), ("a", 2)], [("b", 0), ("b", 1)]], id="apart"),
    ],
)
def test_calls_with_equal_parameters_share_batches(
    recording: RecordingGenerator, across_calls: bool, expected: list[list[tuple[str, int]]]
) -> None:
    scheduler = scheduler_on(recording, max_batch_size=4, across_calls=across_calls)
    a = [job(i, prompt="a") for i in range(3)]
    b = [job(i, prompt="b") for i in range(2)]
    received: dict[str, list[RenderedImage]] = {}

    async def scenario() -> None:
        async def gather_images(name: str, jobs: list[SamplingJob]) -> None:
            received[name] = [image async for group in scheduler.render(jobs) for image in group]

        await asyncio.gather(gather_images("a", a), gather_images("b", b))

    asyncio.run(scenario())
    assert recording.sampled == expected
    # Each call gets exactly its own images, as they look when made alone.
    for name, jobs in (("a", a), ("b", b)):
        assert [image.job for image in received[name]] == jobs
        for image in received[name]:
            alone = recording.generator.render([image.job])[0].data
            assert mean_abs_difference(image.data, alone) <= 1.0


def test_a_call_that_goes_away_stops_a_batch_only_it_wanted(
    recording: RecordingGenerator,
) -> None:
    scheduler = scheduler_on(recording)
    gone = [job(i, prompt="gone", steps=30, width=512, height=512) for i in range(2)]
    reached, gate = recording.hold(0)

    async def scenario() -> None:
        task = asyncio.create_task(collect(scheduler, gone))
        await until(reached)
        gate.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The worker is free at once for the next call.
        assert await collect(scheduler, [job(0, prompt="next")]) == [[0]]

    asyncio.run(scenario())
    assert [call[0][0] for call in recording.sampled] == ["gone", "next"]
    assert recording.interrupted == [True, False]  # stopped at a step, not run to its end


def test_a_shared_batch_goes_on_for_the_call_that_stays(recording: RecordingGenerator) -> None:
    scheduler = scheduler_on(recording, max_batch_size=4)
    reached, gate = recording.hold(0)

    async def scenario() -> None:
        leaving = asyncio.create_task(collect(scheduler, [job(0, prompt="leaving")]))
        staying = asyncio.create_task(collect(scheduler, [job(0, prompt="staying")]))
        await until(reached)  # one batch with both calls' jobs
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        gate.set()
        assert await staying == [[0]]

    asyncio.run(scenario())
    assert recording.sampled == [[("leaving", 0), ("staying", 0)]]


@pytest.mark.parametrize("stage", ["sample", "encode"])
def test_a_failed_batch_fails_only_the_calls_in_it(
    recording: RecordingGenerator, stage: str
) -> None:
    scheduler = scheduler_on(recording)
    recording.fail_prompt = "doomed"
    recording.fail_stage = stage
    reached, gate = recording.hold(0)

    async def scenario() -> None:
        doomed = asyncio.create_task(collect(scheduler, [job(0, prompt="doomed")]))
        await until(reached)
        # Other parameters: it waits for the next batch rather than joining the doomed one.
        fine = asyncio.create_task(collect(scheduler, [job(0, prompt="fine", steps=1)]))
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(RuntimeError, match=f"{stage}: CUDA error"):
            await doomed
        assert await fine == [[0]]

    asyncio.run(scenario())


class IdleRecorder:
    """A scheduler's ``when_idle``: how many batches had been made each time it ran."""

    def __init__(self, recording: RecordingGenerator) -> None:
        self.recording = recording
        self.batches_made: list[int] = []
        self.ran = threading.Event()

    def __call__(self) -> None:
        self.batches_made.append(len(self.recording.sampled))
        self.ran.set()

    def scheduler(self) -> RenderScheduler:
        return RenderScheduler(self.recording, max_batch_size=2, across_calls=True, when_idle=self)


def test_the_worker_gives_memory_back_once_idle_not_between_batches(
    recording: RecordingGenerator,
) -> None:
    idle = IdleRecorder(recording)
    scheduler = idle.scheduler()

    async def burst(*calls: list[SamplingJob]) -> None:
        idle.ran.clear()
        await asyncio.gather(*(collect(scheduler, jobs) for jobs in calls))
        await until(idle.ran)

    async def scenario() -> None:
        # Two calls that can't share batches: three batches, one idle moment after the last.
        await burst([job(i) for i in range(4)], [job(0, prompt="other", steps=1)])
        await burst([job(0)])

    asyncio.run(scenario())
    assert idle.batches_made == [3, 4]


def test_calls_one_after_another_do_not_give_memory_back_between_them(
    recording: RecordingGenerator,
) -> None:
    idle = IdleRecorder(recording)
    scheduler = idle.scheduler()

    async def scenario() -> None:
        # As one client sends requests: each call as soon as the one before has its images.
        for _ in range(3):
            await collect(scheduler, [job(0), job(1)])
        await until(idle.ran)

    asyncio.run(scenario())
    assert idle.batches_made == [3]
