//! lb (being written).
