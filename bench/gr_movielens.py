"""What the generative-recommenders benchmarks share (bench/upstream_hstu_train.py, upstream_dlrm_hstu_train.py):
upstream's research ``MovielensDataProcessor``, its ml-20m branch, over a GroupLens folder. Needs the
generative-recommenders checkout on ``sys.path`` and pandas."""

import gzip
import os
import zipfile


def movielens_processor(movielens: str):  # -> generative_recommenders' MovielensDataProcessor
    """Upstream's ml-20m processor over ``movielens``'s ``ratings.csv`` (or ``.csv.gz``) and ``movies.csv``, zipped
    into ``./tmp`` where its download() extracts from (call it in the folder the processor should write under),
    told the catalogue's largest movie id (ml-20m's constants are 131,262 and 26,744 items)."""
    import generative_recommenders.research.data.preprocessor as preprocessor
    import pandas as pd

    os.makedirs("tmp", exist_ok=True)
    with zipfile.ZipFile("tmp/movielens20m.zip", "w") as z:
        for name in ("ratings.csv", "movies.csv"):
            path = os.path.join(movielens, name)
            with (open(path, "rb") if os.path.exists(path) else gzip.open(path + ".gz")) as f:
                z.writestr(f"ml-20m/{name}", f.read())
    movies = pd.read_csv(os.path.join(movielens, "movies.csv"))
    return preprocessor.MovielensDataProcessor("(local)", "tmp/movielens20m.zip", prefix="ml-20m",
                                               convert_timestamp=False,
                                               expected_max_item_id=int(movies["movieId"].max()))
