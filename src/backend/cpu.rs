//! The CPU executor (filled in by the engine-core work).
