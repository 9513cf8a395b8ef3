"""Adapter registry: versions, their states and lineage, and the checksums of their files.

Versions are folders `<data_dir>/adapters/v0001`, … plus an `adapters` row holding the state,
lineage (parent, dataset hash, label count, training config), metrics and the sha256 of every
file; `verify()` recomputes the checksums before anything loads an adapter, so a corrupted or
tampered file is refused with a clear error instead of serving garbage.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway.adapters.models import Adapter
from gateway.store.base import utcnow

TRANSITIONS = {
    "training": {"candidate", "failed"},
    "candidate": {"challenger", "champion", "retired"},
    "challenger": {"champion", "retired", "candidate"},
    "champion": {"retired"},
    "retired": {"champion"},  # rollback
    "failed": set(),
}


class RegistryError(Exception):
    """A refused registry operation (unknown version, illegal transition, bad files)."""


class AdapterCorrupt(RegistryError):
    pass




def file_checksums(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        out[str(path.relative_to(folder))] = digest.hexdigest()
    return out


class AdapterRegistry:
    def __init__(self, sessions: async_sessionmaker, data_dir: Path) -> None:
        self.sessions = sessions  # also for the experiments, which share the registry's database
        self.root = Path(data_dir) / "adapters"

    def path(self, version: str) -> Path:
        return self.root / version

    async def create(self, *, run_id: int | None, base_model: str, parent: str | None, config: dict) -> Adapter:
        """A new version in state `training`; the version number is the next free one."""
        for _ in range(5):
            now = utcnow()
            async with self.sessions() as session:
                last = await session.scalar(select(func.max(Adapter.version)))
                version = f"v{int(last[1:]) + 1 if last else 1:04d}"
                row = Adapter(version=version, state="training", parent=parent, run_id=run_id, base_model=base_model,
                              label_count=0, train_examples=0, config=config, metrics={}, files={},
                              created_at=now, updated_at=now)
                session.add(row)
                try:
                    await session.commit()
                    return row
                except IntegrityError:
                    await session.rollback()
        raise RegistryError("could not allocate an adapter version")

    async def get(self, version: str) -> Adapter | None:
        async with self.sessions() as session:
            return await session.get(Adapter, version)

    async def list(self) -> list[Adapter]:
        async with self.sessions() as session:
            return list(await session.scalars(select(Adapter).order_by(Adapter.version)))

    async def champion(self) -> Adapter | None:
        async with self.sessions() as session:
            return await session.scalar(select(Adapter).where(Adapter.state == "champion"))

    async def update(self, version: str, **fields: object) -> None:
        async with self.sessions() as session, session.begin():
            await session.execute(update(Adapter).where(Adapter.version == version).values(updated_at=utcnow(), **fields))

    async def transition(self, version: str, state: str, reason: str | None = None, **fields: object) -> Adapter:
        """Move a version along the state machine; becoming champion retires the current one."""
        async with self.sessions() as session, session.begin():
            row = await session.get(Adapter, version)
            if row is None:
                raise RegistryError(f"no adapter version '{version}'")
            if state not in TRANSITIONS[row.state]:
                raise RegistryError(f"adapter {version} is '{row.state}'; it cannot become '{state}'")
            now = utcnow()
            if state == "champion":
                await session.execute(update(Adapter).where(Adapter.state == "champion")
                                      .values(state="retired", updated_at=now, reason=f"replaced by {version}"))
            row.state, row.updated_at = state, now
            if reason is not None:
                row.reason = reason
            for key, value in fields.items():
                setattr(row, key, value)
        return row

    async def seal(self, version: str) -> dict[str, str]:
        """Record the checksums of a finished adapter's files."""
        files = file_checksums(self.path(version))
        if not any(name.endswith((".safetensors", ".bin")) for name in files):
            raise AdapterCorrupt(f"adapter {version} has no weight file in {self.path(version)}")
        await self.update(version, files=files)
        return files

    async def verify(self, version: str) -> Path:
        """The adapter's folder, after checking every recorded checksum (and that files were recorded)."""
        row = await self.get(version)
        if row is None:
            raise RegistryError(f"no adapter version '{version}'")
        folder = self.path(version)
        if not row.files:
            raise AdapterCorrupt(f"adapter {version} has no recorded files (training did not finish)")
        actual = file_checksums(folder) if folder.is_dir() else {}
        for name, digest in row.files.items():
            if name not in actual:
                raise AdapterCorrupt(f"adapter {version}: file '{name}' is missing from {folder}")
            if actual[name] != digest:
                raise AdapterCorrupt(f"adapter {version}: checksum mismatch for '{name}' (file changed or corrupted)")
        return folder
