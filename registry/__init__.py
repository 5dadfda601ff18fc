"""The lab's memory: the SQLite lineage store, checkpoint folder inspection, Hub sync."""

from registry.folder import CheckpointError, CheckpointInfo, inspect_checkpoint
from registry.refs import Ref, RefError, resolve_ref
from registry.store import RELATIONS, SCHEMA_VERSION, Registry, RegistryError, mermaid

__all__ = ["CheckpointError", "CheckpointInfo", "inspect_checkpoint", "Ref", "RefError",
           "resolve_ref", "RELATIONS", "SCHEMA_VERSION", "Registry", "RegistryError", "mermaid"]
