"""moord.actors.snapshotter."""
