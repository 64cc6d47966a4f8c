//! The benchmark (filled in by the limiter issue).
