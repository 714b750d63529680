//! data-io integration tests.
