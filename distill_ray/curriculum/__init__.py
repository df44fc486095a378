"""SKIntern's progressive curriculum: schedule, K compression, demonstrations, the stage actor."""
