"""Hardware profiles (configs/hardware/*.yaml, from the seed's hardware guide §6.2.1): per worker, caps
on a job's max_new_tokens and beams, and the batch budgets that fit the device.

A job above a cap is refused (``invalid_request`` naming the cap and the profile), not clamped: a
caller who asked for 1,024 tokens should not silently get 256, and the caps are announced with the
worker (``belle-queue workers``), so a producer can check before it sends (``--check-workers``).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from producer.errors import ErrorCode
from producer.schemas import GenerationRequest
from producer.settings import Settings
from worker.errors import JobFailure

# The settings a profile sets, unless the environment or the command line set them.
BATCH_SETTINGS = ("batch_max_size", "batch_max_tokens")


class HardwareProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    max_new_tokens: int = Field(ge=1, le=2048, description="Most tokens a job may ask for here.")
    num_beams: int = Field(ge=1, le=10, description="Most beams, and most returned sequences, a job may ask for here.")
    batch_max_size: int = Field(ge=1)
    batch_max_tokens: int = Field(ge=1)

    def check(self, request: GenerationRequest) -> None:
        """Raise JobFailure(invalid_request) for a job over this profile's caps."""
        for parameter, value, cap in (("max_new_tokens", request.max_new_tokens, self.max_new_tokens),
                                      ("num_beams", request.num_beams, self.num_beams),
                                      ("num_return_sequences", request.num_return_sequences, self.num_beams)):
            if value > cap:
                # The worker sees every field set (the wire form): a value equal to the built-in default may not be the caller's.
                default = f" (the default for a request that leaves {parameter} unset)" if value == GenerationRequest.model_fields[parameter].default else ""
                raise JobFailure(
                    ErrorCode.INVALID_REQUEST,
                    f"{parameter} must be in [1, {cap}] on this worker (hardware profile {self.name}: {self.description}), got {value}{default}; "
                    f"submit with {parameter}={cap} or less, or to a worker with a larger profile",
                    parameter=parameter,
                )


def profiles_dir(settings: Settings) -> Path:
    return settings.configs_dir / "hardware"


def load_profile(ref: str, settings: Settings) -> HardwareProfile:
    """``ref``: a profile name (configs/hardware/NAME.yaml) or a path to a YAML file."""
    path = profiles_dir(settings) / f"{ref}.yaml"
    if not path.is_file():
        path = Path(ref).expanduser()
    if not path.is_file():
        known = sorted(p.stem for p in profiles_dir(settings).glob("*.yaml"))
        raise FileNotFoundError(f"--profile {ref!r} is neither a profile in {profiles_dir(settings)} ({', '.join(known)}) nor a YAML file")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return HardwareProfile.model_validate({"name": path.stem, **data})


def batch_settings(profile: HardwareProfile, explicit: set[str]) -> dict[str, int]:
    """The batch settings the profile brings, except those set explicitly."""
    return {name: getattr(profile, name) for name in BATCH_SETTINGS if name not in explicit}
