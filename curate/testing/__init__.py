"""Support for tests and demos: tiny real models, fault-injecting stages. Not imported by the pipeline."""
