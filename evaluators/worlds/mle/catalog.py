"""The offline competitions: how each is built, deterministically, from data inside PyPI packages.

Every builder returns the same four tables MLE-bench prepares for a Kaggle competition (train with
the target, test without it, the hidden answers, a sample submission) plus the task description.
Real data comes from scikit-learn's bundled files (``load_*`` never downloads); the synthetic sets
are drawn from numpy's ``default_rng`` with a fixed seed rather than sklearn's generators, whose
streams are not promised to stay the same across releases. Rows are shuffled and split with the
same kind of seeded generator, and ids are a random permutation so their order says nothing about
the row. Sizes are small: every reference program runs in a few seconds on one core.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

METRICS = ("accuracy", "auc", "log_loss", "rmse")
LOWER_IS_BETTER = {"accuracy": False, "auc": False, "log_loss": True, "rmse": True}
TEST_FRACTION = 0.3


@dataclass(frozen=True)
class Built:
    """One competition's files before they are written (``public/``, ``private/``, description)."""

    train: pd.DataFrame
    test: pd.DataFrame
    answers: pd.DataFrame  # id and the target: private/answers.csv
    sample_submission: pd.DataFrame
    description: str
    target: str
    classes: tuple[str, ...] = ()  # log-loss competitions: one probability column per class


@dataclass(frozen=True)
class Spec:
    """A competition of the catalog: its id, metric, which split it belongs to, and its builder."""

    id: str
    metric: str
    split: str  # "train" (collect) or "heldout" (evaluate)
    build: Callable[[], Built]


def _ids_and_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row order for train and test, and the id of every row."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test = round(n * TEST_FRACTION)
    ids = rng.permutation(n) + 1000  # four digits everywhere: no id looks like a row number
    return np.sort(order[n_test:]), np.sort(order[:n_test]), ids


def _assemble(frame: pd.DataFrame, target: str, seed: int, metric: str, title: str, overview: str,
              classes: tuple[str, ...] = ()) -> Built:
    """Split ``frame`` (features and ``target``) into the four tables and write the description."""
    train_rows, test_rows, ids = _ids_and_split(len(frame), seed)
    frame = frame.reset_index(drop=True)
    frame.insert(0, "id", ids)
    train = frame.iloc[train_rows].sort_values("id").reset_index(drop=True)
    test_full = frame.iloc[test_rows].sort_values("id").reset_index(drop=True)
    answers = test_full[["id", target]].reset_index(drop=True)
    test = test_full.drop(columns=[target])
    sample = _sample_submission(test["id"], train[target], target, metric, classes)
    description = _describe(title, overview, train, test, sample, target, metric, classes)
    return Built(train, test, answers, sample, description, target, classes)


def _sample_submission(ids: pd.Series, targets: pd.Series, target: str, metric: str,
                       classes: tuple[str, ...]) -> pd.DataFrame:
    """A valid but uninformed submission: the first class, 0.5, uniform probabilities, or 0."""
    if metric == "log_loss":
        return pd.DataFrame({"id": ids, **{c: 1.0 / len(classes) for c in classes}})
    if metric == "accuracy":
        return pd.DataFrame({"id": ids, target: sorted(targets.unique())[0]})
    return pd.DataFrame({"id": ids, target: 0.5 if metric == "auc" else 0.0})


_METRIC_TEXT = {
    "accuracy": "Submissions are scored by **accuracy**: the share of test rows whose predicted `{target}` "
                "equals the true one. Higher is better.",
    "auc": "Submissions are scored by the **area under the ROC curve** between the predicted probability "
           "that `{target}` is 1 and the true value. Higher is better.",
    "log_loss": "Submissions are scored by **multi-class log loss**: for each test row, give a probability for "
                "every class ({columns}); rows are rescaled to sum to 1 and clipped away from 0 and 1. Lower is "
                "better.",
    "rmse": "Submissions are scored by the **root mean squared error** between the predicted and true "
            "`{target}`. Lower is better.",
}


def _describe(title: str, overview: str, train: pd.DataFrame, test: pd.DataFrame, sample: pd.DataFrame,
              target: str, metric: str, classes: tuple[str, ...]) -> str:
    columns = ", ".join(f"`{c}`" for c in classes)
    return "\n".join([
        f"# {title}", "", "## Overview", "", overview, "",
        "## Evaluation", "", _METRIC_TEXT[metric].format(target=target, columns=columns), "",
        "## Data", "",
        f"- `train.csv`: {len(train)} rows: `id`, {len(train.columns) - 2} feature columns and the target `{target}`.",
        f"- `test.csv`: {len(test)} rows: `id` and the same features, without `{target}`.",
        "- `sample_submission.csv`: a correctly formatted submission.", "",
        "## Submission format", "",
        f"A CSV file with a header and one row per test row, with the columns {', '.join(sample.columns)}:", "",
        "```", sample.head(3).to_csv(index=False).strip(), "```", "",
    ])


# --- the competitions --------------------------------------------------------------------------


def _iris() -> Built:
    from sklearn.datasets import load_iris

    data = load_iris(as_frame=True)
    frame = data.data.rename(columns=lambda c: c.replace(" (cm)", "_cm").replace(" ", "_"))
    frame["species"] = [str(data.target_names[i]) for i in data.target]
    return _assemble(frame, "species", 11, "accuracy", "Iris species",
                     "Predict the species of an iris flower (setosa, versicolor or virginica) from the length "
                     "and width of its sepals and petals.")


def _wine() -> Built:
    from sklearn.datasets import load_wine

    data = load_wine(as_frame=True)
    frame = data.data.rename(columns=lambda c: c.replace("/", "_"))
    frame["cultivar"] = [f"class_{i}" for i in data.target]
    classes = ("class_0", "class_1", "class_2")
    return _assemble(frame, "cultivar", 12, "log_loss", "Wine cultivar",
                     "Three cultivars of wine grown in the same region of Italy were analysed chemically. "
                     "Predict the probability of each cultivar from the 13 measurements.", classes)


def _breast_cancer() -> Built:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.data.rename(columns=lambda c: c.replace(" ", "_"))
    frame["malignant"] = 1 - data.target  # sklearn codes benign as 1
    return _assemble(frame, "malignant", 13, "auc", "Breast cancer diagnosis",
                     "Features computed from digitised images of fine-needle aspirates of breast masses. "
                     "Predict the probability that a mass is malignant (`malignant` = 1).")


def _digits() -> Built:
    from sklearn.datasets import load_digits

    data = load_digits(as_frame=True)
    frame = data.data.astype("int64")
    frame["label"] = data.target
    return _assemble(frame, "label", 14, "accuracy", "Handwritten digits",
                     "Each row is an 8x8 image of a handwritten digit: 64 pixel intensities from 0 to 16 in "
                     "columns `pixel_0_0` ... `pixel_7_7` (row, column). Predict the digit (0-9).")


def _diabetes() -> Built:
    from sklearn.datasets import load_diabetes

    data = load_diabetes(as_frame=True, scaled=False)
    frame = data.data.copy()
    frame["progression"] = data.target
    return _assemble(frame, "progression", 15, "rmse", "Diabetes progression",
                     "Ten baseline measurements of diabetes patients (age, sex, body-mass index, blood pressure "
                     "and six blood serum values `s1`-`s6`). Predict `progression`, a quantitative measure of "
                     "disease progression one year later.")


def _friedman() -> Built:
    rng = np.random.default_rng(2024)
    n = 1500
    x = rng.uniform(size=(n, 10))
    y = 10 * np.sin(np.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2 + 10 * x[:, 3] + 5 * x[:, 4]
    frame = pd.DataFrame(np.round(x, 5), columns=[f"x{i}" for i in range(10)])
    frame["y"] = np.round(y + rng.normal(scale=1.0, size=n), 5)
    return _assemble(frame, "y", 16, "rmse", "Friedman regression",
                     "A synthetic regression problem: `y` depends non-linearly on some of the ten inputs "
                     "`x0`-`x9` (all uniform on [0, 1]) plus Gaussian noise; the rest are distractors.")


def _loan_default() -> Built:
    rng = np.random.default_rng(2025)
    n = 3000
    employment = rng.choice(["salaried", "self_employed", "unemployed", "retired"], size=n, p=[.6, .2, .1, .1])
    region = rng.choice(["north", "south", "east", "west"], size=n)
    age = rng.integers(19, 80, size=n)
    income = np.round(rng.lognormal(10.3, 0.5, size=n), -1)
    debt_ratio = np.round(rng.beta(2, 5, size=n), 4)
    accounts = rng.poisson(3, size=n)
    late = rng.poisson(0.4, size=n)
    job_risk = {"salaried": 0.0, "self_employed": 0.4, "unemployed": 1.3, "retired": -0.3}
    logit = (-1.2 + 3.5 * debt_ratio + 0.7 * late - 0.9 * (np.log(income) - 10.3)
             + np.array([job_risk[e] for e in employment]) + 0.02 * np.abs(age - 45)
             + 0.3 * (region == "south") + 0.5 * debt_ratio * late)
    default = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype("int64")
    frame = pd.DataFrame({"age": age, "income": income, "debt_ratio": debt_ratio, "open_accounts": accounts,
                          "late_payments": late.astype("float64"), "employment": employment, "region": region})
    frame.loc[rng.uniform(size=n) < 0.08, "income"] = np.nan  # missing values, as real tables have
    frame.loc[rng.uniform(size=n) < 0.05, "late_payments"] = np.nan
    frame["default"] = default
    return _assemble(frame, "default", 17, "auc", "Loan default",
                     "A synthetic credit table with numeric and categorical columns and some missing values. "
                     "Predict the probability that a loan defaults (`default` = 1).")


CATALOG: tuple[Spec, ...] = (
    Spec("iris-species", "accuracy", "train", _iris),
    Spec("wine-cultivar", "log_loss", "train", _wine),
    Spec("digits-recognition", "accuracy", "train", _digits),
    Spec("diabetes-progression", "rmse", "train", _diabetes),
    Spec("loan-default", "auc", "train", _loan_default),
    Spec("breast-cancer-diagnosis", "auc", "heldout", _breast_cancer),
    Spec("friedman-regression", "rmse", "heldout", _friedman),
)
SPECS = {spec.id: spec for spec in CATALOG}


@functools.cache
def build(competition_id: str) -> Built:
    """The built tables of a catalog competition (cached: they are deterministic and never mutated)."""
    return SPECS[competition_id].build()
