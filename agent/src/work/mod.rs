//! The work engine: applies ManifestWorks to the spoke and keeps them applied.
