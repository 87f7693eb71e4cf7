//! Where a pipeline's files are.
