//! Joins attribution x GPU samples x pods into a per-pod NodeSnapshot every poll.
