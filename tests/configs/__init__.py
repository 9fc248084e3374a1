"""Tests of shoal.configs: the DistributedStrategy schema and the environment contract."""
