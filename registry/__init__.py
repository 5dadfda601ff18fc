"""The lab's memory: the SQLite lineage store, checkpoint folder inspection, Hub sync."""

from registry.folder import CheckpointError, CheckpointInfo, inspect_checkpoint
from registry.refs import Ref, RefError, resolve_ref
from registry.relations import RELATIONS, Relation
from registry.store import (SCHEMA_VERSION, AuditEntry, Registry, RegistryError, User,
                            mermaid)

__all__ = ["CheckpointError", "CheckpointInfo", "inspect_checkpoint", "Ref", "RefError",
           "resolve_ref", "RELATIONS", "Relation", "SCHEMA_VERSION", "AuditEntry", "Registry",
           "RegistryError", "User", "mermaid"]
