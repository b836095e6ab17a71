"""Filling from a pool: pick the real, unlabelled rows worth labelling next.

- `select`: the strategies behind one interface (`fac` deficit cover, and the active-
  learning baselines `random`, `uncertainty`, `top-score`, `coreset`), over a `PoolView`
  of what is known: the pool's feature activity and pooled residuals, the current model's
  scores, the labelled rows so far.
- `stream`: the same picks streamed over a pool's Parquet shards (the ray engine), keeping
  a bounded set of candidates per strategy, then `select` decides among them.
- `labels`: who labels the picked rows (a person through files, the pool's own label
  column, or the label gate's judges), the label journal, and the to-label files.
"""
