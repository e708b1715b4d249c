//! The store: the only code that touches sled.
