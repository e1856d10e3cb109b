"""The `dynamo` command line."""
