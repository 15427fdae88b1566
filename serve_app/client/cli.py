"""The flux-serve command: build the tiny models, or use a running service (generate, health;
jobs: submit, job, wait, cancel)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path, PurePosixPath
from typing import Any, get_args
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from serve_app.client.flux_client import (
    DEFAULT_URL,
    FluxAPIError,
    FluxClient,
    FluxConnectionError,
    FluxError,
    FluxTimeoutError,
)
from serve_app.client.images import image_source
from serve_app.jobs.schemas import Job, JobRequest
from serve_app.models.sources import quiet_progress_bars
from serve_app.models.tiny import TINY_CLIP_NAME, TINY_FLUX_NAME, TINY_LORAS_NAME, ensure_tiny_model
from serve_app.schemas import Diversity, GeneratedImage, GenerateRequest, Lora, SeedMode
from serve_app.settings import get_settings


class ExitCode(IntEnum):
    """What the command's exit status means, for scripts."""

    OK = 0
    LOCAL_FAILURE = 1
    REFUSED = 2
    UNAVAILABLE = 3
    TIMEOUT = 4
    SERVER_ERROR = 5


EXIT_CODES = """\
exit codes:
  0  success
  1  a local failure, such as an output folder that cannot be written
  2  bad usage, or the service refused the request (4xx: an invalid parameter, or a missing or
     wrong API key); the service's message and the parameter at fault are shown
  3  the service is unreachable, or not ready
  4  the service did not answer within --timeout
  5  the service failed (5xx), or answered something that is not the API
"""

# Scripts read piped output: there, table rows stay on one line and URLs whole.
_PIPED_WIDTH = 1000


def build_tiny_models(cache_dir: Path) -> None:
    """Build the embedded tiny FLUX, its LoRA library and CLIP into ``cache_dir`` (each kept if
    already there)."""
    quiet_progress_bars()  # the folders go to stdout; a bar per saved file is noise on stderr
    for name in (TINY_FLUX_NAME, TINY_LORAS_NAME, TINY_CLIP_NAME):
        print(ensure_tiny_model(name, cache_dir))


def image_file_name(image: GeneratedImage, index_digits: int = 2) -> str:
    """A file name that carries the image's parameters: ``03_euler_4steps_cfg1.0_seed123.png``."""
    params = image.sampling_params
    extension = PurePosixPath(urlsplit(image.url).path).suffix or ".png"
    return (
        f"{image.index:0{index_digits}d}_{params.sampler}_{params.steps}steps"
        f"_cfg{params.cfg_scale}_seed{params.seed}{extension}"
    )


def generate(
    client: FluxClient, request: GenerateRequest, out: Path | None, console: Console
) -> ExitCode:
    """Stream ``request`` with a progress bar, save the images into ``out``, print a table."""
    expected = request.top_k or request.nof_images
    index_digits = max(2, len(str(request.nof_images - 1)))
    saved: dict[int, Path] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with _progress_bar(console) as progress, client.stream(request) as images:
        label = f"best {request.top_k} of {request.nof_images}" if request.top_k else "images"
        task = progress.add_task(label, total=expected)
        for image in images:
            if out is not None:
                saved[image.index] = _save(client, image, out, index_digits)
            progress.advance(task)
    response = images.result
    assert response is not None  # the stream raises unless it ends with its result
    _stdout_console().print(_images_table(response.images, saved))
    where = f", saved in {out}" if out is not None else ""
    console.print(
        f"{response.count} images in {response.latency_ms / 1000:.1f} s"
        f" (request {response.request_id}){where}",
        markup=False,
        highlight=False,
    )
    return ExitCode.OK


def _progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _save(client: FluxClient, image: GeneratedImage, out: Path, index_digits: int) -> Path:
    path = out / image_file_name(image, index_digits)
    path.write_bytes(client.download(image))
    return path


def submit(
    client: FluxClient, request: JobRequest, idempotency_key: str | None, console: Console
) -> Job:
    """Queue ``request`` as a job and print its id on stdout."""
    job = client.submit(request, idempotency_key=idempotency_key)
    _stdout_console().print(job.id, markup=False, highlight=False)
    console.print(f"job {job.id} {job.status}", markup=False, highlight=False)
    return job


def wait(client: FluxClient, job_id: str, out: Path | None, console: Console) -> ExitCode:
    """Follow a job with a progress bar until it ends; print (and save) its images."""
    with _progress_bar(console) as progress:
        task = progress.add_task(f"job {job_id[:8]}", total=None)

        def show(job: Job) -> None:
            progress.update(
                task,
                total=job.progress.total,
                completed=job.progress.done,
                description=f"job {job.id[:8]} {job.status}",
            )

        job = client.wait(job_id, on_progress=show)
    return _job_report(client, job, out, console)


def _job_report(client: FluxClient, job: Job, out: Path | None, console: Console) -> ExitCode:
    saved: dict[int, Path] = {}
    if out is not None and job.images:
        out.mkdir(parents=True, exist_ok=True)
        digits = max(2, len(str(max(image.index for image in job.images))))
        saved = {image.index: _save(client, image, out, digits) for image in job.images}
    if job.images:
        _stdout_console().print(_images_table(job.images, saved))
    where = f", saved in {out}" if saved else ""
    console.print(
        f"job {job.id} {job.status}: {job.progress.done} of {job.progress.total} images{where}",
        markup=False,
        highlight=False,
    )
    if job.error is not None:
        _error(console, f"the job failed ({job.error.type}): {job.error.message}")
        return ExitCode.SERVER_ERROR
    return ExitCode.OK


def show_job(client: FluxClient, job_id: str) -> ExitCode:
    """Print a job object as JSON on stdout."""
    print(client.job(job_id).model_dump_json(indent=2))
    return ExitCode.OK


def cancel(client: FluxClient, job_id: str, console: Console) -> ExitCode:
    """Cancel a job and say how far it got."""
    job = client.cancel(job_id)
    console.print(
        f"job {job.id} {job.status}: kept {job.progress.done} of {job.progress.total} images",
        markup=False,
        highlight=False,
    )
    return ExitCode.OK


def health(client: FluxClient, console: Console) -> ExitCode:
    """Print whether the service is ready."""
    readiness = client.health()
    if readiness.ready:
        _stdout_console().print(f"ready: {readiness.detail}", markup=False, highlight=False)
        return ExitCode.OK
    _error(console, f"not ready: {readiness.detail}")
    return ExitCode.UNAVAILABLE


def loras(client: FluxClient, console: Console) -> ExitCode:
    """Print the service's LoRA adapters (and the library's files it refuses)."""
    listing = client.loras()
    table = Table("name", "rank", "alpha", "layers", "size", "digest")
    for info in listing.loras:
        size = f"{info.size_bytes / 2**20:.1f} MiB"
        layers = f"{info.modules} ({len(info.layers)} kinds)"
        table.add_row(info.name, str(info.rank), f"{info.alpha:g}", layers, size, info.digest)
    _stdout_console().print(table)
    for refused in listing.refused:
        console.print(f"refused {refused.name}: {refused.reason}", markup=False, highlight=False)
    console.print(
        f"{len(listing.loras)} adapters; at most {listing.max_per_request} per request",
        markup=False,
        highlight=False,
    )
    return ExitCode.OK


def _images_table(images: list[GeneratedImage], saved: dict[int, Path]) -> Table:
    table = Table("#", "score", "sampler", "steps", "cfg", "seed")
    table.add_column("url", overflow="fold")
    with_adapters = any(image.sampling_params.loras for image in images)
    if with_adapters:
        table.add_column("loras")
    if saved:
        table.add_column("file")
    for image in images:
        params = image.sampling_params
        score = "-" if image.score is None else f"{image.score:.2f}"
        row = [str(image.index), score, params.sampler, str(params.steps)]
        row += [str(params.cfg_scale), str(params.seed), image.url]
        if with_adapters:
            row.append(_adapters_text(params.loras))
        if saved:
            row.append(str(saved.get(image.index, "")))
        table.add_row(*row)
    return table


def _adapters_text(adapters: tuple[Lora, ...]) -> str:
    return ", ".join(f"{lora.name}:{lora.scale:g}" for lora in adapters) or "-"


def _stdout_console() -> Console:
    console = Console()
    if not console.is_terminal:
        console.width = _PIPED_WIDTH
    return console


def _error(console: Console, message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message))


def _failure(error: FluxError, arguments: argparse.Namespace, console: Console) -> ExitCode:
    """Explain ``error`` and pick the exit code."""
    if isinstance(error, FluxConnectionError):
        _error(console, f"{error}\nIs the service running? Point --url or FLUX_SERVE_URL at it.")
        return ExitCode.UNAVAILABLE
    if isinstance(error, FluxTimeoutError):
        _error(
            console,
            f"the service at {arguments.url} did not answer within {arguments.timeout:g} s; "
            "raise --timeout, or ask for fewer or smaller images",
        )
        return ExitCode.TIMEOUT
    if isinstance(error, FluxAPIError) and error.is_client_error:
        lines = [
            f"the service refused the request (HTTP {error.status}, {error.type}): {error.message}"
        ]
        if error.param:
            lines.append(f"param: {error.param}")
        if error.status == 401:
            lines.append("Pass an API key with --api-key or FLUX_SERVE_API_KEY.")
        _error(console, "\n".join(lines))
        return ExitCode.REFUSED
    if isinstance(error, FluxAPIError):
        where = f"HTTP {error.status}" if error.status else "during the stream"
        _error(console, f"the service failed ({where}, {error.type}): {error.message}")
        return ExitCode.SERVER_ERROR
    _error(console, f"unexpected answer from the service: {error}")
    return ExitCode.SERVER_ERROR


def _request(arguments: argparse.Namespace) -> GenerateRequest:
    """The request as given (see _fields)."""
    return GenerateRequest.model_construct(**_fields(arguments))


def _job_request(arguments: argparse.Namespace) -> JobRequest:
    """The job as given (see _fields)."""
    fields = _fields(arguments) | _given({"webhook": arguments.webhook})
    return JobRequest.model_construct(**fields)


def _fields(arguments: argparse.Namespace) -> dict[str, Any]:
    """The request as given, not validated here: the service checks it against its own limits
    (which may differ from this machine's settings) and names the field at fault."""
    diversity = _given(
        {
            "samplers": arguments.samplers,
            "nof_steps": arguments.steps,
            "cfg_scales": arguments.cfg_scales,
            "seeds": arguments.seeds,
        }
    )
    fields: dict[str, Any] = {
        "prompt": arguments.prompt,
        "nof_images": arguments.nof_images,
        "gpus": arguments.gpus,
        "top_k": arguments.top_k,
        "width": arguments.width,
        "height": arguments.height,
        "image": arguments.image,
        "mask": arguments.mask,
        "strength": arguments.strength,
        "negative_prompt": arguments.negative_prompt,
        "base_seed": arguments.base_seed,
        "diversity": Diversity.model_construct(**diversity) if diversity else None,
        "loras": arguments.loras,
    }
    return _given(fields)


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _comma_list(parse: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse_list(text: str) -> list[Any]:
        try:
            return [parse(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}") from error

    return parse_list


def _lora(text: str) -> Lora:
    """``NAME`` or ``NAME:SCALE``; the service checks the name and the scale's bounds."""
    name, separator, scale = text.partition(":")  # names never hold a colon
    try:
        return Lora.model_construct(name=name, scale=float(scale) if separator else 1.0)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: the scale is not a number") from error


def _image_argument(text: str) -> str:
    try:
        return image_source(text)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error.strerror or error}") from error


def _service_url(text: str) -> str:
    if urlsplit(text).scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def _positive_seconds(text: str) -> float:
    seconds = float(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _service_options() -> argparse.ArgumentParser:
    """Options of every command that talks to a running service."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--url",
        type=_service_url,
        default=os.environ.get("FLUX_SERVE_URL", DEFAULT_URL),
        help=f"The service (default: $FLUX_SERVE_URL, else {DEFAULT_URL}).",
    )
    options.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("FLUX_SERVE_API_KEY"),
        help="API key, sent as a Bearer token (default: $FLUX_SERVE_API_KEY).",
    )
    options.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=300.0,
        help="Seconds to wait for each answer from the service (default: %(default)g).",
    )
    return options


def _request_options(parser: argparse.ArgumentParser) -> None:
    """The options of a request, for generate and submit."""
    parser.add_argument("prompt", help="What to draw.")
    parser.add_argument(
        "-n", "--nof-images", metavar="N", type=int, help="How many images (default 16)."
    )
    parser.add_argument(
        "--samplers",
        metavar="NAMES",
        type=_comma_list(str),
        help="Samplers to vary over, e.g. euler,dpmpp_2m.",
    )
    parser.add_argument(
        "--steps", metavar="LIST", type=_comma_list(int), help="Step counts to vary over, e.g. 2,4."
    )
    parser.add_argument(
        "--cfg-scales",
        metavar="LIST",
        type=_comma_list(float),
        help="Guidance scales to vary over, e.g. 1,3.5.",
    )
    parser.add_argument(
        "--seeds", choices=get_args(SeedMode), help="How seeds are chosen (default mix)."
    )
    parser.add_argument("--top-k", metavar="K", type=int, help="Keep only the K best images.")
    parser.add_argument(
        "--width", metavar="PX", type=int, help="Width in pixels, a multiple of 16."
    )
    parser.add_argument(
        "--height", metavar="PX", type=int, help="Height in pixels, a multiple of 16."
    )
    parser.add_argument(
        "--image",
        metavar="FILE",
        type=_image_argument,
        help="Input image for image-to-image (PNG, JPEG or WebP; or an https:// URL the "
        "service may fetch).",
    )
    parser.add_argument(
        "--mask",
        metavar="FILE",
        type=_image_argument,
        help="Inpainting mask of the image's size: white is repainted, black kept.",
    )
    parser.add_argument(
        "--strength",
        metavar="S",
        type=float,
        help="How much of the image is repainted, in (0, 1] (default 0.8).",
    )
    parser.add_argument(
        "--negative-prompt", metavar="TEXT", help="What to steer away from (cfg above 1)."
    )
    parser.add_argument(
        "--base-seed", metavar="SEED", type=int, help="Seed of fixed and mix seeding."
    )
    parser.add_argument(
        "--gpus", metavar="N", type=int, help="How many workers may share the request."
    )
    parser.add_argument(
        "--lora",
        metavar="NAME[:SCALE]",
        dest="loras",
        action="append",
        type=_lora,
        help="Apply a LoRA adapter of the service's library (see `flux-serve loras`), at SCALE "
        "(default 1); repeat for several.",
    )


def _job_commands(commands: Any, service: list[argparse.ArgumentParser]) -> None:
    """submit, job, wait and cancel."""
    keep_layout = argparse.RawDescriptionHelpFormatter
    submitting = commands.add_parser(
        "submit",
        parents=service,
        help="Queue a job for a prompt and print its id (with --wait, wait for its images).",
        epilog=EXIT_CODES,
        formatter_class=keep_layout,
    )
    _request_options(submitting)
    submitting.add_argument("--webhook", metavar="URL", help="Where to POST the job's end.")
    submitting.add_argument(
        "--idempotency-key", metavar="KEY", help="Submitting again with it gives the same job."
    )
    submitting.add_argument("--wait", action="store_true", help="Wait for the job, as `wait`.")
    submitting.add_argument("--out", metavar="DIR", type=Path, help="With --wait: save here.")
    for name, what in (("job", "Print a job's state."), ("cancel", "Cancel a job.")):
        command = commands.add_parser(
            name, parents=service, help=what, epilog=EXIT_CODES, formatter_class=keep_layout
        )
        command.add_argument("job_id", metavar="ID", help="The job's id.")
    waiting = commands.add_parser(
        "wait",
        parents=service,
        help="Wait for a job with a progress bar, then print (and save) its images.",
        epilog=EXIT_CODES,
        formatter_class=keep_layout,
    )
    waiting.add_argument("job_id", metavar="ID", help="The job's id.")
    waiting.add_argument("--out", metavar="DIR", type=Path, help="Save the images here.")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``flux-serve``."""
    keep_layout = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="flux-serve", description=__doc__, epilog=EXIT_CODES, formatter_class=keep_layout
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build-tiny-models",
        help="Build the embedded tiny FLUX, its LoRAs and CLIP, and print where.",
    )
    build.add_argument(
        "cache_dir",
        nargs="?",
        type=Path,
        help="Folder to build into (default: FLUX_SERVE_CACHE_DIR, ~/.cache/flux-serve).",
    )
    service = [_service_options()]
    generating = commands.add_parser(
        "generate",
        parents=service,
        help="Generate images for a prompt, with a progress bar, and download them.",
        description="Generate images for a prompt: stream them with a progress bar, save them\n"
        "under names that carry their parameters, and print a table of them.\n"
        "Options left out take the service's defaults.",
        epilog=EXIT_CODES,
        formatter_class=keep_layout,
    )
    _request_options(generating)
    generating.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="Download the images into this folder (created if needed).",
    )
    _job_commands(commands, service)
    commands.add_parser(
        "loras",
        parents=service,
        help="List the LoRA adapters the service can apply.",
        epilog=EXIT_CODES,
        formatter_class=keep_layout,
    )
    commands.add_parser(
        "health",
        parents=service,
        help="Check that the service is up and ready.",
        epilog=EXIT_CODES,
        formatter_class=keep_layout,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    arguments = build_parser().parse_args(argv)
    if arguments.command == "build-tiny-models":
        build_tiny_models(arguments.cache_dir or get_settings().cache_dir)
        return ExitCode.OK
    # Messages stay whole lines, for people and for scripts that grep them.
    console = Console(stderr=True, soft_wrap=True)
    try:
        with FluxClient(
            arguments.url, api_key=arguments.api_key, timeout=arguments.timeout
        ) as client:
            return _command(client, arguments, console)
    except FluxError as error:
        return _failure(error, arguments, console)
    except OSError as error:
        _error(console, str(error))
        return ExitCode.LOCAL_FAILURE


def _command(client: FluxClient, arguments: argparse.Namespace, console: Console) -> ExitCode:
    command = arguments.command
    if command == "health":
        return health(client, console)
    if command == "loras":
        return loras(client, console)
    if command == "generate":
        return generate(client, _request(arguments), arguments.out, console)
    if command == "submit":
        job = submit(client, _job_request(arguments), arguments.idempotency_key, console)
        if not arguments.wait:
            return ExitCode.OK
        return wait(client, job.id, arguments.out, console)
    if command == "job":
        return show_job(client, arguments.job_id)
    if command == "cancel":
        return cancel(client, arguments.job_id, console)
    return wait(client, arguments.job_id, arguments.out, console)


if __name__ == "__main__":
    raise SystemExit(main())
