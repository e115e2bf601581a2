//! db (being written).
