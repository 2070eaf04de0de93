"""Published numbers (mAP %) of CSA and other re-rankers: the one table the book, notebooks and README cite.

Sources: the CSA repository's README table and test log (MCC-WH/CSA, ResNet-101 GeM gl18 descriptors)
and the SSR paper's table (Shen et al., NeurIPS 2021, comparable features).  Not produced here.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

__all__ = ["PUBLISHED", "published_table", "FIRST_STAGE"]

#: Name of the no-re-ranking row in every table of this package.
FIRST_STAGE = "first stage"

_CSA_TABLE = "CSA repository README table (MCC-WH/CSA), R101-GeM gl18 descriptors"
_CSA_LOG = "CSA repository README test log (MCC-WH/CSA), K=1024"
_SSR_TABLE = "SSR paper table (Shen et al., NeurIPS 2021), comparable features"


def _published() -> pd.DataFrame:
    rows = []
    csa_table = {  # method: (ROxf, ROxf+R1M, RPar, RPar+R1M), each (Medium, Hard)
        FIRST_STAGE: ((67.3, 44.3), (49.5, 25.7), (80.6, 61.5), (57.3, 29.8)),
        "affinity cosine (L = 512)": ((72.0, 51.1), (52.8, 30.5), (82.9, 66.8), (66.5, 43.4)),
        "CSA": ((78.2, 59.1), (61.5, 38.2), (88.2, 75.3), (71.6, 51.0)),
        "CSA (augmented training)": ((80.3, 62.4), (62.8, 39.4), (90.0, 78.6), (73.0, 53.0)),
    }
    for method, values in csa_table.items():
        for dataset, (medium, hard) in zip(("roxford5k", "roxford5k+r1m", "rparis6k", "rparis6k+r1m"), values):
            rows.append((method, dataset, medium, hard, _CSA_TABLE))
    rows += [("CSA", "roxford5k", 77.92, 58.43, _CSA_LOG), ("CSA", "rparis6k", 87.2, 74.41, _CSA_LOG)]
    ssr_table = {  # method: ((ROxf Medium, Hard), (RPar Medium, Hard))
        "αQE": ((68.2, 44.0), (84.3, 67.2)),
        "AQE": ((70.8, 48.0), (85.3, 68.8)),
        "k-reciprocal": ((72.1, 50.7), (87.9, 74.8)),
        "diffusion (regional)": ((69.0, 44.7), (89.5, 80.0)),
        "SSR": ((75.6, 54.2), (84.4, 67.8)),
        "LAttQE": ((73.4, 49.6), (86.3, 70.6)),
    }
    for method, (oxf, par) in ssr_table.items():
        rows.append((method, "roxford5k", oxf[0], oxf[1], _SSR_TABLE))
        rows.append((method, "rparis6k", par[0], par[1], _SSR_TABLE))
    return pd.DataFrame(rows, columns=["method", "dataset", "medium_map", "hard_map", "source"])


#: Published Medium / Hard mAP (%) for the compared methods, one row per (method, dataset, source).
PUBLISHED: pd.DataFrame = _published()


def published_table(methods: Sequence[str] | None = None) -> pd.DataFrame:
    """:data:`PUBLISHED` as one row per method and one ``Medium / Hard`` column per benchmark."""
    table = PUBLISHED if methods is None else PUBLISHED[PUBLISHED["method"].isin(list(methods))]
    table = table.drop_duplicates(["method", "dataset"])  # the CSA table first, the README log after it
    cells = table.assign(value=table["medium_map"].map("{:.1f}".format) + " / " + table["hard_map"].map("{:.1f}".format))
    wide = cells.pivot(index="method", columns="dataset", values="value").fillna("")
    order = [c for c in ("roxford5k", "roxford5k+r1m", "rparis6k", "rparis6k+r1m") if c in wide.columns]
    names = list(dict.fromkeys(table["method"]))
    wide = wide.loc[names, order]
    wide.columns = [f"{c} (M / H)" for c in order]
    return wide
