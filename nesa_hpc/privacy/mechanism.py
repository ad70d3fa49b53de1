"""The privacy transform applied on rank 0 to exactly the activations Z that leave it, and its ledger.

Mechanisms (``privacy.mechanism``):

- ``none``: Z leaves unchanged (the exactness baseline).
- ``gaussian``: (epsilon, delta)-differential privacy. Each unit of Z is clipped to L2 norm C, then
  isotropic Gaussian noise of standard deviation sigma is added to every real position. Adjacency is
  replace-one (two inputs that differ in one unit, with the same token length), so the L2 sensitivity
  is 2C and sigma = 2C * s(epsilon, delta), with s from the analytic Gaussian mechanism
  (``dp_accounting.get_sigma_gaussian``, Balle & Wang 2018). With ``privacy.releases = R`` the
  (epsilon, delta) budget covers R releases of the same row (generation: one per decode step), and
  sigma grows by sqrt(R), which is exact for Gaussian composition.
- ``sigma``: clip (when ``privacy.clip`` is set) and add Gaussian noise of the given absolute standard
  deviation ``privacy.sigma`` in the units of Z. No formal claim: only the audit speaks for it.
- ``dchi``: metric differential privacy at k=0 (d_chi-privacy): each token's row gets noise with density
  proportional to exp(-epsilon * ||n||_2), so two tokens whose embeddings are d apart are
  (epsilon * d)-indistinguishable. This is *not* (epsilon, delta)-DP.

Units (``privacy.unit``): ``token`` clips each position's row of Z (sound only at k=0, where rows do not
mix: at k>0 every row depends on the tokens before it); ``sequence`` clips the whole row's Z (all its
real positions, Frobenius norm), sound at any k.

Noise is drawn on rank 0 only, once per release, from a generator keyed by (key, input row, release
index): the key comes from the OS's secure randomness, or from ``privacy.seed`` for reproducible
experiments. A row's noise therefore does not depend on the batch it lands in or on the world size.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from randomgen import ChaCha

from ..errors import UserError

log = logging.getLogger("nesa_hpc")

__all__ = ["Privacy", "PrivacySpec", "Ledger", "make_privacy", "gaussian_sigma", "calibrate_clip", "auto_clip",
           "clip_norms", "unit_norms", "percentile_clip", "MECHANISMS", "UNITS", "PrivacyConfigError", "noise_key",
           "NOISE_KEYING",
           "key_dir", "default_key_path", "write_key", "read_key"]

MECHANISMS = ("none", "gaussian", "sigma", "dchi")
UNITS = ("token", "sequence")


class PrivacyConfigError(UserError):
    """A privacy setting that cannot be honoured; the message names the option."""


@dataclass(frozen=True)
class PrivacySpec:
    """Validated ``privacy.*`` options (see conf/privacy/*.yaml for their meaning)."""

    mechanism: str = "none"
    unit: str = "sequence"
    epsilon: float | None = None
    delta: float | None = None
    clip: float | str | None = None  # a number, "auto" (public calibration text) or None (no clipping)
    clip_percentile: float = 90.0
    calibration_path: str | None = None
    sigma: float | None = None
    seed: int | None = None
    releases: int = 1
    key_path: str | None = None  # where an OS noise key is kept until the job completes (None: the default)

    @property
    def adds_noise(self) -> bool:
        return self.mechanism != "none"

    def check(self, k: int) -> None:
        """Refuse settings whose claim would be false at split point ``k``."""
        m = self.mechanism
        if m == "none":
            return
        if m in ("gaussian", "dchi") and (self.epsilon is None or self.epsilon <= 0):
            raise PrivacyConfigError(f"privacy.mechanism={m} needs privacy.epsilon > 0")
        if m == "gaussian":
            if self.delta is None or not 0 < self.delta < 1:
                raise PrivacyConfigError("privacy.mechanism=gaussian needs 0 < privacy.delta < 1")
            if self.clip is None:
                raise PrivacyConfigError("privacy.mechanism=gaussian needs privacy.clip (a norm, or auto to "
                                         "estimate it from public calibration text)")
        if m == "sigma" and (self.sigma is None or self.sigma < 0):
            raise PrivacyConfigError("privacy.mechanism=sigma needs privacy.sigma >= 0 (absolute noise std)")
        if m == "dchi" and k != 0:
            raise PrivacyConfigError(f"privacy.mechanism=dchi is metric DP on token embeddings and needs split.k=0 "
                                     f"(got split.k={k}): at k>0 a row of Z mixes every earlier token")
        if m in ("gaussian", "sigma") and self.unit == "token" and k != 0:
            raise PrivacyConfigError(
                f"privacy.unit=token with split.k={k}: clipping each position's row bounds one token's influence "
                "only at k=0; after any layer a row mixes every earlier token of the sequence, so a per-token "
                "guarantee would be false. Use privacy.unit=sequence, or split.k=0")


def gaussian_sigma(epsilon: float, delta: float, sensitivity: float, releases: int = 1) -> float:
    """Noise std so that ``releases`` Gaussian releases with L2 ``sensitivity`` are (epsilon, delta)-DP in all.

    The analytic Gaussian mechanism gives the noise multiplier s for one release; R releases at noise
    multiplier s*sqrt(R) compose to exactly one release at s, so sigma = sensitivity * s * sqrt(R).
    """
    from dp_accounting import get_sigma_gaussian

    return float(sensitivity * get_sigma_gaussian(epsilon, delta) * math.sqrt(releases))


class Ledger:
    """Epsilon spent per row as a function of how many times that row was released.

    Gaussian releases are composed with Google's dp-accounting PLD accountant (noise multiplier
    sigma / sensitivity, at the job's delta), on a grid of 1e-4 relative to epsilon. d_chi releases add
    up linearly (metric DP composes additively). ``none`` and ``sigma`` make no claim: their epsilon is inf and nan.
    """

    def __init__(self, mechanism: str, delta: float | None, noise_multiplier: float | None,
                 epsilon: float | None) -> None:
        self.mechanism = mechanism
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.epsilon_per_release = epsilon
        self._cache: dict[int, float] = {}

    def epsilon(self, releases: int) -> float:
        if releases <= 0:
            return 0.0
        if self.mechanism == "none":
            return math.inf
        if self.mechanism == "sigma":
            return math.nan
        if self.mechanism == "dchi":
            return float(self.epsilon_per_release * releases)
        if releases not in self._cache:
            from dp_accounting import GaussianDpEvent, SelfComposedDpEvent, get_epsilon_gaussian
            from dp_accounting.pld import PLDAccountant

            # the PLD's grid spacing follows the size of epsilon (1e-4 relative, at least 1e-4 absolute): a
            # fixed 1e-4 grid needs millions of buckets when the noise is small and epsilon in the thousands
            scale = get_epsilon_gaussian(self.noise_multiplier / math.sqrt(releases), self.delta)
            acc = PLDAccountant(value_discretization_interval=max(1e-4, 1e-4 * scale))
            acc.compose(SelfComposedDpEvent(GaussianDpEvent(self.noise_multiplier), releases))
            self._cache[releases] = float(acc.get_epsilon(self.delta))
        return self._cache[releases]

    def per_row(self, releases: Iterable[int]) -> np.ndarray:
        return np.array([self.epsilon(int(r)) for r in releases], dtype=np.float64)


def unit_norms(z: torch.Tensor, mask: torch.Tensor, unit: str) -> torch.Tensor:
    """L2 norms of the units of Z (B, T, H): per real position (N,) for token, per row (B,) for sequence."""
    m = mask.bool()
    if unit == "token":
        return z[m].norm(dim=-1)
    return (z * m.unsqueeze(-1)).flatten(1).norm(dim=-1)


def clip_norms(z: torch.Tensor, mask: torch.Tensor, unit: str, clip: float) -> torch.Tensor:
    """Scale each unit of Z down to L2 norm <= ``clip``; padded positions become zero."""
    m = mask.bool().unsqueeze(-1)
    z = torch.where(m, z, torch.zeros((), dtype=z.dtype))
    if unit == "token":
        norms = z.norm(dim=-1, keepdim=True)  # (B, T, 1)
    else:
        norms = z.flatten(1).norm(dim=-1).view(-1, 1, 1)  # (B, 1, 1)
    scale = torch.clamp(clip / torch.clamp(norms, min=1e-30), max=1.0)
    return z * scale


# What keys a release's noise beside the job's key (:meth:`Privacy.draw`). Results files and training runs
# record it, so that a run of a version that keyed the noise otherwise is not resumed with other noise.
NOISE_KEYING = "ChaCha20 keyed by (key, row, release, content), one stream per position"


def noise_key(seed: int | None) -> bytes:
    return secrets.token_bytes(32) if seed is None else f"nesa_hpc-seed:{int(seed)}".encode()


def key_dir() -> Path:
    """The owner's private folder of noise keys: ``$NESA_HPC_KEYS``, or ``noise-keys`` under the cache folder
    (``$NESA_HPC_CACHE``, default ``~/.cache/nesa_hpc``), never the results' folder."""
    if os.environ.get("NESA_HPC_KEYS"):
        return Path(os.environ["NESA_HPC_KEYS"]).expanduser()
    return Path(os.environ.get("NESA_HPC_CACHE", Path.home() / ".cache" / "nesa_hpc")).expanduser() / "noise-keys"


def default_key_path(output_path: str | Path) -> Path:
    """Where the OS noise key of the results file ``output_path`` is kept by default: in :func:`key_dir`, named
    after a hash of the file's absolute path (one key per results file)."""
    digest = hashlib.sha256(str(Path(output_path).expanduser().resolve()).encode()).hexdigest()[:32]
    return key_dir() / f"{digest}.noise-key"


def _private(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid() and not st.st_mode & 0o077


def write_key(path: str | Path, key: bytes) -> None:
    """Create ``path`` holding ``key``: a new file (``O_EXCL``: an existing file or link there is an error, so
    nothing planted in advance is reused or followed) of mode 0600, in a folder created 0700 when missing;
    the mode and owner are checked after creation."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        folder.mkdir(parents=True, mode=0o700)
    mode = os.stat(folder).st_mode
    if mode & 0o022 and not mode & stat.S_ISVTX:  # others could swap the file (a sticky /tmp is fine)
        raise PrivacyConfigError(f"privacy.key_path {path}: its folder {folder} is writable by other users; use a "
                                 "folder of your own (mode 0700)")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise PrivacyConfigError(f"privacy.key_path {path} already exists; a new job writes a new key (remove the "
                                 "file if it belongs to no job you will resume)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _private(st):
            raise PrivacyConfigError(f"privacy.key_path {path}: created with mode {oct(st.st_mode & 0o777)}, not "
                                     "0600 (check the folder's default ACLs)")
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(key)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def read_key(path: str | Path) -> bytes:
    """The key at ``path``, refused when it is a link, not a regular file, or readable by other users."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise PrivacyConfigError(f"privacy.key_path {path}: cannot open the noise key ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or not _private(st):
            raise PrivacyConfigError(f"privacy.key_path {path}: mode {oct(st.st_mode & 0o777)} or owner uid "
                                     f"{st.st_uid}: a noise key must be a file of yours with mode 0600")
        return fh.read()


@dataclass
class Privacy:
    """Applies a mechanism to Z on rank 0 and keeps count of what each row has released."""

    spec: PrivacySpec = field(default_factory=PrivacySpec)
    clip: float | None = None  # resolved clip norm in units of Z (None: no clipping)
    sigma: float = 0.0  # Gaussian std in units of Z (gaussian, sigma)
    key: bytes = b""
    releases: dict[int, int] = field(default_factory=dict)  # input row -> releases made by this job

    @property
    def mechanism(self) -> str:
        return self.spec.mechanism

    def apply(self, z: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None,
              releases: int | list[int] = 0, counted: bool = True,
              digests: list[bytes] | None = None) -> torch.Tensor:
        """Transform Z (B, T, H) before it is sent; ``mask`` (B, T) marks real tokens and ``rows`` (B,)
        the input rows. ``releases`` numbers the releases of the same row (generation: decode steps), one
        for every row or one per row. ``digests`` (per row, :meth:`nesa_hpc.io.batch.Batch.digests`): the
        rows' content, which keys the noise with the row and the release (the jobs always pass them; without
        them the noise depends on the row's index and release alone).
        ``counted=False``: Z is a function of what the workers already returned, not of the row (a decode
        step at k=0 without a denoiser embeds a token picked from their outputs alone), so the ledger does
        not count it; it still gets fresh noise. Padded positions are sent as zeros, since at k>0 they
        depend on the row's real tokens."""
        if rows is not None and counted:
            for r in rows.tolist():
                self.releases[r] = self.releases.get(r, 0) + 1
        if not self.spec.adds_noise:
            return z
        if rows is None:
            raise ValueError("privacy.apply needs the input row numbers to key the noise")
        # clip and noise in float64, cast once at the end: in bf16 a clipped norm would round up past C and
        # the noise would be rounded before it is added. A NaN/Inf would pass the clip (its norm is not a
        # number): non-finite values are zeroed first (the caller marks such rows from Z before this call).
        dtype = z.dtype
        z = torch.nan_to_num(z.double(), nan=0.0, posinf=0.0, neginf=0.0)
        z = clip_norms(z, mask, self.spec.unit, self.clip) if self.clip is not None else \
            torch.where(mask.bool().unsqueeze(-1), z, torch.zeros((), dtype=z.dtype))
        noise = torch.zeros_like(z)
        m = mask.bool()
        H = z.shape[-1]
        per_row = releases if isinstance(releases, list) else [releases] * len(rows)
        contents = digests if digests is not None else [b""] * len(rows)
        for i, (r, release, content) in enumerate(zip(rows.tolist(), per_row, contents, strict=True)):
            n = int(m[i].sum())
            if n:
                noise[i][m[i]] = self.draw(r, int(release), n, H, content).to(device=z.device)
        return (z + noise).to(dtype)

    def draw(self, row: int, release: int, n: int, H: int, content: bytes = b"") -> torch.Tensor:
        """The noise of ``row``'s release ``release`` ((n, H), float64), keyed by the job's key, the row, the
        release and the row's ``content`` digest: the same row, release and content always get the same
        noise (a resumed run re-sends a row it had sent without a second release), and anything else gets
        independent noise. The bits come from ChaCha20 (a cryptographic stream: no output reveals its key
        or any other output), each position from a stream of its own (counter ``position << 64``), so the
        noise at known positions (a chat template's tokens) says nothing about the rest."""
        tail = f":{row}:{release}".encode() + (b":" + content if content else b"")
        key = int.from_bytes(hashlib.blake2b(self.key + tail, digest_size=32).digest(), "little")
        out = np.empty((n, H))
        bits = ChaCha(key=key, counter=0, rounds=20)
        rng = np.random.Generator(bits)
        for p in range(n):
            bits.seed(key=key, counter=p << 64)  # the same stream as a new ChaCha(key, counter), made faster
            if self.spec.mechanism == "dchi":
                # density ∝ exp(-eps ||x||): a uniform direction times a Gamma(H, 1/eps) radius
                direction = rng.standard_normal(H)
                out[p] = direction / np.linalg.norm(direction) * rng.gamma(shape=H, scale=1.0 / self.spec.epsilon)
            else:
                out[p] = rng.standard_normal(H) * self.sigma
        return torch.from_numpy(out)

    def guarantee(self) -> str:
        """The claim, in words. Seeded noise is known to whoever knows the seed (and repeats across jobs that
        share it), so a seeded run claims nothing, whatever its epsilon."""
        s = self.spec
        if not s.adds_noise:
            return "none (activations leave rank 0 unchanged)"
        if s.mechanism == "sigma":
            return "none (noise without a formal claim)"
        claim = {"gaussian": "(epsilon, delta)-DP, replace-one adjacency",
                 "dchi": "metric DP (d_chi), epsilon per unit of L2 distance"}[s.mechanism]
        if s.seed is not None:
            return f"no formal guarantee (seeded noise: privacy.seed={s.seed}); with OS noise: {claim}"
        return claim

    def ledger(self) -> Ledger:
        nm = self.sigma / (2 * self.clip) if self.spec.mechanism == "gaussian" else None
        return Ledger(self.spec.mechanism, self.spec.delta, nm, self.spec.epsilon)

    def attrs(self) -> dict:
        """Root attributes recorded in the results file (the settings; the spent budget is added at the end)."""
        s = self.spec
        out = {"privacy_mechanism": s.mechanism}
        if not s.adds_noise:
            out.update(privacy_unit="none", privacy_epsilon=math.inf, privacy_delta=float("nan"),
                       privacy_clip=float("nan"), privacy_sigma=0.0, privacy_seed="none",
                       privacy_releases_budget=int(s.releases),
                       privacy_guarantee="none (activations leave rank 0 unchanged)")
        else:
            out.update(privacy_unit=s.unit if s.mechanism != "dchi" else "token",
                       privacy_epsilon=_num(s.epsilon), privacy_delta=_num(s.delta),
                       privacy_clip=_num(self.clip), privacy_sigma=float(self.sigma),
                       privacy_seed="os" if s.seed is None else int(s.seed),
                       privacy_releases_budget=int(s.releases), privacy_guarantee=self.guarantee())
            if s.clip == "auto":
                out.update(privacy_clip_source=f"percentile {s.clip_percentile:g} of {s.unit} norms at layer k on "
                                               f"{s.calibration_path or 'the built-in public text'}")
        return out


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def make_privacy(spec: PrivacySpec | str, k: int = 0, clip: float | None = None, key: bytes | None = None) -> Privacy:
    """Build the transform; ``clip`` is the resolved norm when ``spec.clip`` is "auto"; ``key`` keys the
    noise (default: from ``spec.seed``, or fresh OS randomness)."""
    if isinstance(spec, str):
        spec = PrivacySpec(mechanism=spec)
    if spec.mechanism not in MECHANISMS:
        raise PrivacyConfigError(f"privacy.mechanism={spec.mechanism!r} is not one of {MECHANISMS}")
    spec.check(k)
    if not spec.adds_noise:
        return Privacy(spec)
    if spec.clip == "auto":
        if clip is None:
            raise ValueError("privacy.clip=auto: the clip norm has not been calibrated")
    elif spec.mechanism != "dchi":
        clip = None if spec.clip is None else float(spec.clip)
    else:
        clip = None
    sigma = 0.0
    if spec.mechanism == "gaussian":
        sigma = gaussian_sigma(spec.epsilon, spec.delta, 2 * clip, spec.releases)
    elif spec.mechanism == "sigma":
        sigma = float(spec.sigma)
    if key is None or spec.seed is not None:
        key = noise_key(spec.seed)
    return Privacy(spec, clip=clip, sigma=sigma, key=key)


def auto_clip(spec: PrivacySpec, adapter, tokenizer, k: int, max_length: int, device) -> float | None:
    """The clip norm of ``privacy.clip=auto`` (calibrated on public text, logged); None for any other clip
    setting or no noise."""
    if not (spec.adds_noise and spec.clip == "auto"):
        return None
    from ..io.public_text import load_texts

    texts = load_texts(spec.calibration_path)
    clip = calibrate_clip(adapter, tokenizer, k, spec.unit, spec.clip_percentile, texts, max_length=max_length,
                          device=device)
    log.info("privacy.clip=auto: C = %.4g (percentile %g of %s norms at layer %d over %d public texts)", clip,
             spec.clip_percentile, spec.unit, k, len(texts))
    return clip


def calibrate_clip(adapter, tokenizer, k: int, unit: str, percentile: float, texts: list[str],
                   max_length: int = 128, batch_size: int = 8, device: torch.device | str = "cpu") -> float:
    """The ``percentile`` of unit norms of Z (layer k) over *public* ``texts``, on the owner's own layers."""
    from ..io.batch import make_batches

    norms = []
    with torch.inference_mode():
        for b in make_batches(enumerate(texts), tokenizer, batch_size, max_length, "right"):
            ids, mask, pos = b.ids.to(device), b.mask.to(device), b.pos.to(device)
            h = adapter.run_layers(range(0, k), adapter.embed(ids, pos), mask, pos)
            norms.append(unit_norms(h.float(), mask, unit).cpu())
    return percentile_clip(torch.cat(norms), percentile)


def percentile_clip(norms: torch.Tensor, percentile: float) -> float:
    """The clip norm of ``privacy.clip=auto``: the ``percentile`` of public unit norms."""
    if not len(norms):
        raise PrivacyConfigError("privacy.clip=auto: the calibration text has no tokens")
    return float(torch.quantile(norms.double(), percentile / 100.0))
