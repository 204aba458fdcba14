"""The platforms a learner trains on: which GPUs they give, how much host (CPU) memory, how long a
session lasts and where files outlive it.

Free Colab gives one T4 and about 12.7 GB of host RAM, sessions of at most about 12 hours (sooner
when idle), and loses /content when a session ends (Google Drive, mounted, keeps files); Kaggle two
T4s, about 29 GB, 12-hour sessions and about 30 GPU hours a week, and keeps /kaggle/working as the
output of a saved version (figures the runtimes show their users; what is known of them is noted in
the project's shared notes). A recipe has to fit both the GPU's memory (m3lab.predict) and the
host's (``m3lab.predict.host``), and finish or resume within the sessions (``m3lab.plan.sessions``).
"""

from __future__ import annotations

from dataclasses import dataclass

from m3lab.gpus import GIB, GPU, gpu_profile

GB = 10**9  # the runtimes show host RAM in decimal gigabytes


@dataclass(frozen=True)
class Platform:
    key: str
    name: str
    gpu: GPU
    host_ram_bytes: int | None  # None: not known, not checked
    session_hours: float | None = None  # the longest a session lasts (None: not limited)
    weekly_gpu_hours: float | None = None  # the GPU time a week allows (None: not limited)
    output_dir: str = "bge-m3-finetuned"  # where checkpoints and the model outlive a session
    storage: str = ""  # how to make output_dir outlive the session, in a sentence
    # what the place that outlives a session holds, and its name (None: not limited, or not known)
    storage_bytes: int | None = None
    storage_place: str = ""
    # where the last session's output comes back, if not in output_dir itself (the resume looks there too)
    previous_output_dirs: tuple[str, ...] = ()

    def describe(self) -> str:
        host = f"{self.host_ram_bytes / GB:.1f} GB host RAM" if self.host_ram_bytes else "host RAM not given"
        return f"{self.name}: {self.gpu.count} x {self.gpu.card_name}, {host}"


PLATFORMS: dict[str, Platform] = {p.key: p for p in [
    Platform("colab-t4", "free Colab", gpu_profile("t4"), int(12.7 * GB), session_hours=12,
             output_dir="/content/drive/MyDrive/bge-m3-finetuned",
             storage="mount Google Drive first (from google.colab import drive; drive.mount('/content/drive')): "
                     "/content is lost when the session ends",
             # a Google account's free storage, shared by Drive, Gmail and Photos (Google One's plans page)
             storage_bytes=15 * GB, storage_place="a free Google account's Drive"),
    Platform("kaggle-t4x2", "Kaggle", gpu_profile("t4x2"), int(29 * GB), session_hours=12, weekly_gpu_hours=30,
             output_dir="/kaggle/working/bge-m3-finetuned",
             storage="run it as a saved version (Save Version, Save & Run All): /kaggle/working is then kept as "
                     "the version's output; in the next session add that output as input (Add Input, Your Work), "
                     "where it is read-only under /kaggle/input and the resume command finds its checkpoint",
             previous_output_dirs=("/kaggle/input",),
             # what a saved version keeps of /kaggle/working (Kaggle's notebook documentation)
             storage_bytes=20 * GB, storage_place="Kaggle's saved output"),
]}


def platform_for(platform: str | None = None, gpu: str | None = None, host_ram_gib: float | None = None) -> Platform:
    """A named platform (``--platform colab-t4``), or a GPU with the host RAM given in GiB
    (``--gpu l4 --host-ram-gib 50``); a GPU alone gets no host limit checked (unknown)."""
    from m3lab.errors import ConfigError

    if platform is not None:
        if gpu is not None or host_ram_gib is not None:
            raise ConfigError([f"--platform {platform} names the GPU and the host RAM; leave out --gpu and "
                               "--host-ram-gib, or use those two instead of --platform."])
        key = platform.lower()
        if key not in PLATFORMS:
            raise ConfigError([f"--platform {platform}: unknown platform; choose one of {', '.join(PLATFORMS)}, "
                               "or give --gpu and --host-ram-gib."])
        return PLATFORMS[key]
    profile = gpu_profile(gpu or "t4")
    if host_ram_gib is not None and host_ram_gib <= 0:
        raise ConfigError([f"--host-ram-gib {host_ram_gib:g}: the host's RAM must be more than 0 GiB."])
    host = int(host_ram_gib * GIB) if host_ram_gib is not None else None
    return Platform(profile.key, profile.name, profile, host)
