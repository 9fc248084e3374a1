"""Configuration: the DistributedStrategy schema and the environment contract (arrive with the PS training and launcher issues)."""
