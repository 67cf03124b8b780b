"""Multi-task data for SAK: the on-disk schema, loaders (Hub streaming or local parquet), the reference transforms,
and ToyRooms, a procedurally rendered indoor dataset that needs no download."""
