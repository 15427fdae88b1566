"""All settings of the service, in one object read from the environment.

The Serve config (config/serve.yaml, or the RayService manifest) sets them through the
application's ``runtime_env.env_vars``, so every replica and the app builder see the same values.
Each variable is the field name in upper case with the ``FLUX_SERVE_`` prefix.
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from serve_app.generation.profiles import PROFILES, ModelProfile

EMBEDDED_MODEL = "tiny"

ImageFormat = Literal["png", "jpeg", "webp"]

# "data:image/webp;base64," and room for media type parameters.
_DATA_URL_HEADER_CHARS = 64
# The rest of a request: prompts of up to 2000 characters JSON-escaped, lists, numbers.
_BODY_BESIDES_INPUTS = 64 * 1024


class ServiceSettings(BaseSettings):
    """Settings of the whole application, validated once at start."""

    model_config = SettingsConfigDict(env_prefix="FLUX_SERVE_", extra="forbid", frozen=True)

    # Models
    model: str = Field(
        EMBEDDED_MODEL,
        description="FLUX pipeline to serve: 'tiny' (built locally, random weights), a Hugging "
        "Face hub id such as black-forest-labs/FLUX.1-schnell, or a local folder.",
    )
    profile: Literal["schnell", "dev"] = Field(
        "schnell", description="Native sampling settings of the model (see generation/profiles.py)."
    )
    scorer_model: str = Field(
        EMBEDDED_MODEL,
        description="CLIP-architecture model that ranks images: 'tiny', a hub id "
        "(openai/clip-vit-large-patch14, yuvalkirstain/PickScore_v1) or a local folder.",
    )
    scorer_processor: str | None = Field(
        None,
        description="Where the scorer's processor lives when not beside its weights "
        "(PickScore uses laion/CLIP-ViT-H-14-laion2B-s32B-b79K).",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "flux-serve",
        description="Folder where the tiny models are built on first use.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' takes CUDA where a GPU is visible, else the CPU."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' takes bfloat16 on CUDA and float32 on the CPU."
    )
    max_batch_size: int = Field(
        4, ge=1, le=64, description="Most images one pipeline call makes; fit it to GPU memory."
    )
    batch_across_requests: bool = Field(
        True,
        description="Fill a worker's batches with jobs of every render call it holds (other "
        "requests included) that can share the pipeline call; off: each batch serves one call.",
    )
    warmup: bool = Field(
        True,
        description="Run one small generation when a replica starts (with compile_mode, also "
        "one batch of the default size, which compiles it).",
    )
    served_model_name: str | None = Field(
        None,
        min_length=1,
        description="Model id of the OpenAI-compatible API: what clients pass as `model` and "
        "GET /v1/models lists. Unset: `model` as given (a hub id such as "
        "black-forest-labs/FLUX.1-schnell, or 'tiny'), or the name of a local folder.",
    )

    # Lossless speed-ups (serve_app/generation/speedups.py); bench/ measures each.
    fuse_qkv: bool = Field(
        False, description="Fuse the query, key and value projections of transformer and VAE."
    )
    channels_last_vae: bool = Field(
        False, description="Run the VAE on channels-last memory (faster convolutions on GPUs)."
    )
    attention_backend: str | None = Field(
        None,
        description="diffusers attention backend of the transformer: '_native_flash', "
        "'_native_cudnn', 'flash' (flash-attn 2), '_flash_3' (flash-attn 3), ... Unset: "
        "PyTorch's scaled_dot_product_attention, which picks a kernel itself.",
    )
    compile_mode: Literal["off", "default", "max-autotune-no-cudagraphs", "max-autotune"] = Field(
        "off",
        description="torch.compile the transformer and the VAE decoder in this mode; each new "
        "image size or batch size compiles once more.",
    )

    # Performance (serve_app/generation/threads.py, prompts.py, quantization.py)
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Threads torch computes on in a FluxWorker replica. Unset: on a CPU, every "
        "core this process may use (Ray would give a replica of num_cpus 0.5 one thread); on a "
        "GPU, torch's own choice.",
    )
    prompt_cache_size: int = Field(
        32,
        ge=0,
        le=4096,
        description="Prompt embeddings a FluxWorker keeps (least recently used go first), so "
        "that the batches of a request, and later requests with the same prompt, run the text "
        "encoders once per text; 0: every batch encodes its distinct texts again.",
    )
    compile_scope: Literal["whole", "blocks"] = Field(
        "whole",
        description="What compile_mode compiles of the transformer: 'whole' (one graph) or "
        "'blocks' (each of its repeated blocks, diffusers' regional compilation: a fraction of "
        "the compile time, nearly the same speed).",
    )
    quantize: Literal["none", "int8_weight_only", "fp8"] = Field(
        "none",
        description="Quantize the transformer's linear layers with torchao after loading, "
        "before compiling (lossy: images move a little; bench/ reports how far): "
        "'int8_weight_only' (any device), 'fp8' (float8 weights and activations, on a GPU of "
        "compute capability 8.9 or newer: L4, L40S, H100, H200).",
    )

    # Reliability
    request_timeout_s: float = Field(
        300, gt=0, description="Deadline of one request; past it the answer is a 504."
    )
    max_concurrent_requests: int = Field(
        32,
        ge=1,
        description="Most requests one ingress replica works on at once, whatever their cost "
        "(a bound on its memory and connections); more get a quick 503.",
    )
    retry_after_s: int = Field(
        5,
        ge=1,
        description="Retry-After of the 503s whose wait can't be estimated: a lost worker, "
        "storage, a full worker queue, the request bound above.",
    )
    admission_deadline_share: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Admission by cost (serve_app/api/admission.py): a request is admitted only "
        "when the estimated work of every admitted request, its own included, fits in this share "
        "of the earliest of their remaining deadlines on the workers at max replicas; otherwise "
        "a quick 503. The rest of the deadline absorbs estimation error.",
    )
    admission_key_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="With API keys on, the share of that admissible work one key may hold; "
        "beyond it a 429 with Retry-After.",
    )
    admission_prior_speed: float = Field(
        0.25,
        gt=0,
        description="Work units per second (one unit: a transformer call over a megapixel) that "
        "a FluxWorker replica is assumed to make until it has reported a batch. Keep it well "
        "below the real speed (the embedded model makes about 10 on a laptop's CPU, fewer while "
        "other replicas share it; FLUX.1-schnell about 4 to 9 on an H100): a higher one admits "
        "work that can't finish in time.",
    )
    admission_speed_window_s: float = Field(
        30,
        gt=0,
        description="Time constant of each replica's moving speed estimate: batches of about the "
        "last this many seconds of pipeline time weigh most.",
    )
    admission_decode_calls: float = Field(
        1.5,
        ge=0,
        description="Work of decoding one image, in transformer calls at its size.",
    )
    admission_image_overhead: float = Field(
        0.05,
        ge=0,
        description="Work of one image that does not grow with its size (prompt encoding, "
        "scheduling), in work units.",
    )
    max_retries: int = Field(
        3, ge=0, le=10, description="Retries of work lost with a worker or scorer replica."
    )
    retry_backoff_s: float = Field(
        0.5, ge=0, description="First wait before such a retry; doubles each time."
    )
    max_body_bytes: int = Field(
        28 * 2**20,
        ge=1024,
        description="Largest request body; larger ones get a 413. It must hold an input image "
        "and mask of max_input_image_bytes each, as data: URLs.",
    )

    # Access
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys; requests must send one as a Bearer token. "
        "Empty: no authentication (the local default).",
    )

    # LoRA adapters (serve_app/generation/adapter_library.py, adapter_runtime.py)
    lora_dir: Path | None = Field(
        None,
        description="Folder of the adapter library: diffusers/peft LoRA files named "
        "<name>.safetensors. Unset (and no lora_s3_url): with the tiny model, its tiny LoRAs "
        "built locally; otherwise no adapters.",
    )
    lora_s3_url: str | None = Field(
        None,
        pattern=r"^s3://[^/]+/.*$",
        description="The adapter library in S3 instead, e.g. s3://my-loras/flux/ (the s3_region "
        "and s3_endpoint_url settings and boto3's credentials apply).",
    )
    max_loras: int = Field(
        3, ge=0, le=8, description="Most adapters one request may apply together."
    )
    lora_max_bytes: int = Field(
        1 << 30, ge=1, description="Largest adapter file a request may use, in bytes."
    )
    lora_max_rank: int = Field(
        64,
        ge=1,
        le=1024,
        description="Highest LoRA rank served; with compile_mode, the rank hot-swapping pads "
        "every adapter to, so that changing adapters never recompiles.",
    )
    lora_cache_size: int = Field(
        8, ge=1, description="Most adapters a worker replica keeps loaded (least recently used go)."
    )
    lora_cache_bytes: int = Field(
        4 << 30, ge=1, description="Most bytes of adapter weights a worker replica keeps loaded."
    )

    # Storage
    storage_backend: Literal["local", "s3"] = Field(
        "local", description="'local': a folder the ingress serves; 's3': an S3 bucket."
    )
    image_format: ImageFormat = Field("png", description="Format of the stored images.")
    image_quality: int = Field(95, ge=1, le=100, description="Quality of JPEG and WebP images.")
    storage_dir: Path = Field(
        Path("var/images"), description="Folder of the local image store (the default backend)."
    )
    public_base_url: str | None = Field(
        None,
        description="Base of image URLs, e.g. https://cdn.example.com. Unset: the URL the "
        "client used to reach the service (local), or the bucket's own URL (s3 public mode).",
    )
    s3_bucket: str | None = Field(None, description="Bucket of the s3 backend.")
    s3_prefix: str = Field("", description="Prefix of every object key, e.g. 'images/'.")
    s3_region: str | None = Field(None, description="Region; unset: boto3's standard chain.")
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO, SeaweedFS, R2, ...)."
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="Bucket in the host name (virtual) or in the path (path)."
    )
    s3_url_mode: Literal["presigned", "public"] = Field(
        "presigned",
        description="'presigned': signed GET URLs that expire; 'public': plain URLs under "
        "public_base_url (a public bucket or a CDN).",
    )
    s3_presign_expires_s: int = Field(
        3600, ge=1, le=604800, description="Lifetime of presigned URLs, in seconds."
    )
    s3_max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts per S3 call (botocore's standard retry mode)."
    )
    s3_conditional_writes: bool = Field(
        True,
        description="Refuse to overwrite an existing object (If-None-Match); turn off for "
        "stores that do not support conditional writes.",
    )

    # Jobs (serve_app/jobs/): queued generation on Celery over Redis, with signed webhooks
    redis_url: str = Field(
        "redis://127.0.0.1:6380/0",
        description="Redis that holds the job queue (Celery's broker and result store) and the "
        "job records. Locally scripts/serve.sh starts one on port 6380 (6379 is Ray's).",
    )
    jobs_queue: str = Field(
        "flux-serve-jobs",
        min_length=1,
        description="Celery queue of the jobs; FluxWorker's autoscaling policy watches it too.",
    )
    webhooks_queue: str = Field(
        "flux-serve-webhooks", min_length=1, description="Celery queue of webhook deliveries."
    )
    jobs_max_attempts: int = Field(
        5,
        ge=1,
        le=50,
        description="Runs of a job that fail (workers lost for good, storage down) before the "
        "job is failed; each new run skips the images already stored.",
    )
    jobs_lease_s: float = Field(
        15,
        gt=0,
        description="A running job's claim on it, renewed every lease/5 seconds: when its runner "
        "dies, another may take the job over this long after the last renewal.",
    )
    jobs_redelivery_s: int = Field(
        120,
        ge=2,
        description="Celery's visibility timeout: a job whose runner died unseen (killed) is "
        "delivered again this long after it was taken.",
    )
    jobs_retention_s: int = Field(
        7 * 24 * 3600, ge=60, description="How long finished jobs can be read, in seconds."
    )
    idempotency_ttl_s: int = Field(
        24 * 3600, ge=60, description="How long an Idempotency-Key names its job, in seconds."
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Standard Webhooks signing secret, 'whsec_' and base64. Unset: jobs with a "
        "webhook are refused (scripts/serve.sh makes one locally).",
    )
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated hosts that webhooks may reach although they resolve to "
        "loopback or private addresses.",
    )
    webhook_timeout_s: float = Field(
        10, gt=0, le=120, description="Time a webhook receiver has to answer one delivery."
    )
    webhook_max_attempts: int = Field(
        6, ge=1, le=20, description="Deliveries of one webhook before it is given up."
    )
    webhook_backoff_s: int = Field(
        2,
        ge=1,
        description="Wait before the second delivery of a webhook; doubles each time (at most "
        "60 s).",
    )

    # Request defaults and limits (they appear in the OpenAPI schema)
    default_width: int = Field(1024, ge=16, multiple_of=16, description="Width when unset.")
    default_height: int = Field(1024, ge=16, multiple_of=16, description="Height when unset.")
    min_size: int = Field(64, ge=16, multiple_of=16, description="Smallest width or height.")
    max_size: int = Field(2048, ge=16, multiple_of=16, description="Largest width or height.")
    max_images: int = Field(64, ge=1, description="Most images one request may ask for.")
    max_gpus_per_request: int = Field(
        8, ge=1, description="Most concurrent FluxWorker calls one request may fan out over."
    )
    max_prompt_chars: int = Field(2000, ge=1, description="Longest prompt, in characters.")
    max_steps: int = Field(64, ge=1, description="Most denoising steps per image.")
    max_cfg_scale: float = Field(20.0, ge=1.0, description="Largest guidance scale.")
    max_diversity_values: int = Field(16, ge=1, description="Longest list in each diversity field.")

    # Image inputs (serve_app/inputs/): image-to-image and inpainting
    max_input_image_bytes: int = Field(
        10 * 2**20,
        ge=1024,
        description="Largest input image or mask, in bytes (decoded from its data: URL, or "
        "fetched); larger ones get a 422. max_body_bytes must hold two of them as data: URLs.",
    )
    max_input_image_pixels: int = Field(
        4096 * 4096,
        ge=64 * 64,
        description="Largest input image or mask, in pixels (width x height), checked before it "
        "is decoded; Pillow's decompression-bomb guard runs as well.",
    )
    image_url_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated hosts whose https:// image URLs the service fetches. "
        "Empty: only data: URLs are taken.",
    )
    image_url_private_hosts: bool = Field(
        False,
        description="Let the hosts of image_url_hosts resolve to loopback, private or "
        "link-local addresses (an image store inside the deployment's own network). Off: they "
        "must resolve to public addresses only, like every other URL the service calls.",
    )
    image_fetch_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Deadline of fetching one image URL, from connecting to the last byte; past "
        "it the request gets a 424.",
    )
    image_fetch_ca_file: Path | None = Field(
        None,
        description="PEM file of the certificate authorities trusted when fetching image URLs "
        "(an internal CA). Unset: the system's (OpenSSL's defaults, so SSL_CERT_FILE works).",
    )

    @property
    def native(self) -> ModelProfile:
        """The model's own sampling settings, used where a request leaves diversity out."""
        return PROFILES[self.profile]

    @property
    def serves_loras(self) -> bool:
        """Whether requests may apply adapters: max_loras above 0 and a library (the deployment's
        own, or the tiny model's)."""
        library = self.lora_dir or self.lora_s3_url or self.model == EMBEDDED_MODEL
        return self.max_loras > 0 and bool(library)

    @property
    def max_data_url_chars(self) -> int:
        """Longest data: URL of an input image: base64 of max_input_image_bytes, and a header."""
        return _DATA_URL_HEADER_CHARS + 4 * -(-self.max_input_image_bytes // 3)

    @property
    def served_model(self) -> str:
        """The model id clients of the OpenAI-compatible API name."""
        if self.served_model_name:
            return self.served_model_name
        # A hub id is "owner/name"; a folder given by its path is known by its name.
        if self.model.startswith(("/", ".", "~")):
            return Path(self.model).name
        return self.model

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("webhook_allowed_hosts", "image_url_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [host.strip().lower() for host in value.split(",") if host.strip()]
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _standard_webhooks_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        value = secret.get_secret_value()
        try:
            valid = value.startswith("whsec_") and bool(base64.b64decode(value[6:], validate=True))
        except binascii.Error:
            valid = False
        if not valid:
            raise ValueError("webhook_secret must be 'whsec_' followed by base64 bytes")
        return secret

    @model_validator(mode="after")
    def _s3_has_a_bucket(self) -> ServiceSettings:
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("storage_backend 's3' needs s3_bucket (FLUX_SERVE_S3_BUCKET)")
        return self

    @model_validator(mode="after")
    def _loras_fit(self) -> ServiceSettings:
        if self.lora_dir is not None and self.lora_s3_url is not None:
            raise ValueError("set lora_dir or lora_s3_url, not both")
        if self.lora_cache_size < self.max_loras:
            raise ValueError(
                f"lora_cache_size {self.lora_cache_size} must hold a request's max_loras "
                f"({self.max_loras}) at once"
            )
        if self.fuse_qkv and self.serves_loras:
            # A fused projection replaces to_q, to_k and to_v, so adapters there would do nothing.
            raise ValueError("fuse_qkv can't be combined with LoRA adapters: set max_loras to 0")
        return self

    @model_validator(mode="after")
    def _body_holds_the_inputs(self) -> ServiceSettings:
        needed = 2 * self.max_data_url_chars + _BODY_BESIDES_INPUTS
        if self.max_body_bytes < needed:
            raise ValueError(
                f"max_body_bytes {self.max_body_bytes} can't hold an image and a mask of "
                f"max_input_image_bytes {self.max_input_image_bytes} as data: URLs: raise it to "
                f"at least {needed}, or lower max_input_image_bytes"
            )
        return self

    @model_validator(mode="after")
    def _consistent_sizes(self) -> ServiceSettings:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} exceeds max_size {self.max_size}")
        for name in ("default_width", "default_height"):
            value = getattr(self, name)
            if not self.min_size <= value <= self.max_size:
                raise ValueError(f"{name} {value} is outside [{self.min_size}, {self.max_size}]")
        return self


@lru_cache(maxsize=1)
def get_settings() -> ServiceSettings:
    """The process's settings, read from the environment once."""
    return ServiceSettings()
