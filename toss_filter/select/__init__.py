"""Step 4, select: which response tokens are unsafe.

- `rules`: each rule over one array of scores (the definitions, and the test oracle of `streaming`).
- `streaming`: the same rules over a sharded run, exactly, without gathering the scores.
"""
