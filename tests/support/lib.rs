//! Helpers for the integration tests in this directory.
