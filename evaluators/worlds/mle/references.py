"""Reference programs: the constant baseline that sets a competition's worst score, the strong model
that sets its best.

Each is a complete ``solution.py`` of the kind the policy is asked to write (read ``DATA_DIR``,
write ``submission.csv``), run in the same sandbox and graded by the same code as the policy's
programs, so the normalised score of a policy program is measured against programs that lived
under the same rules. ``python -m exitagent.competitions calibrate`` runs them and records the raw
values in ``recorded.json``; a test runs them again and checks the record.
"""

from __future__ import annotations

from evaluators.worlds.mle.catalog import SPECS, build

_HEAD = '''import os

import numpy as np
import pandas as pd

data = os.environ["DATA_DIR"]
train = pd.read_csv(os.path.join(data, "train.csv"))
test = pd.read_csv(os.path.join(data, "test.csv"))
target = {target!r}
features = [c for c in train.columns if c not in ("id", target)]
'''

_BASELINES = {
    "accuracy": 'prediction = train[target].mode().iloc[0]\n'
                'pd.DataFrame({{"id": test["id"], target: prediction}}).to_csv("submission.csv", index=False)\n',
    "auc": 'pd.DataFrame({{"id": test["id"], target: 0.5}}).to_csv("submission.csv", index=False)\n',
    "rmse": 'pd.DataFrame({{"id": test["id"], target: train[target].mean()}}).to_csv("submission.csv", index=False)\n',
    "log_loss": 'priors = train[target].value_counts(normalize=True)\n'
                'submission = pd.DataFrame({{"id": test["id"]}})\n'
                'for label in {classes!r}:\n'
                '    submission[label] = priors.get(label, 0.0)\n'
                'submission.to_csv("submission.csv", index=False)\n',
}

_PREDICT = {
    "accuracy": 'pd.DataFrame({{"id": test["id"], target: model.predict(X_test)}}).to_csv("submission.csv", '
                'index=False)\n',
    "auc": 'pd.DataFrame({{"id": test["id"], target: model.predict_proba(X_test)[:, 1]}}).to_csv('
           '"submission.csv", index=False)\n',
    "rmse": 'pd.DataFrame({{"id": test["id"], target: model.predict(X_test)}}).to_csv("submission.csv", '
            'index=False)\n',
    "log_loss": 'probabilities = model.predict_proba(X_test)\n'
                'submission = pd.DataFrame(probabilities, columns=list(model.classes_))\n'
                'submission.insert(0, "id", test["id"].to_numpy())\n'
                'submission[["id", *{classes!r}]].to_csv("submission.csv", index=False)\n',
}

# The strong model of each competition: imports, then code that fits ``model`` and sets ``X_test``.
_SCALED_LOGISTIC = '''from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

model = make_pipeline(StandardScaler(), LogisticRegression(C={c}, max_iter=5000))
model.fit(train[features], train[target])
X_test = test[features]
'''

_STRONG = {
    "iris-species": _SCALED_LOGISTIC.format(c=1.0),
    "wine-cultivar": _SCALED_LOGISTIC.format(c=0.3),
    "breast-cancer-diagnosis": _SCALED_LOGISTIC.format(c=0.3),
    "digits-recognition": '''from sklearn.svm import SVC

model = SVC(C=10.0, gamma=0.001)
model.fit(train[features], train[target])
X_test = test[features]
''',
    "diabetes-progression": '''from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
model.fit(train[features], train[target])
X_test = test[features]
''',
    "friedman-regression": '''from sklearn.ensemble import HistGradientBoostingRegressor

model = HistGradientBoostingRegressor(max_iter=400, learning_rate=0.05, random_state=0)
model.fit(train[features], train[target])
X_test = test[features]
''',
    "loan-default": '''from sklearn.ensemble import HistGradientBoostingClassifier

both = pd.get_dummies(pd.concat([train[features], test[features]]), columns=["employment", "region"], dtype=float)
X_train, X_test = both.iloc[: len(train)], both.iloc[len(train):]
model = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_depth=3, random_state=0)
model.fit(X_train, train[target])
''',
}


def _classes(competition_id: str) -> tuple[str, ...]:
    return build(competition_id).classes if SPECS[competition_id].metric == "log_loss" else ()


def baseline_program(competition_id: str) -> str:
    """The constant baseline: majority class, 0.5, class priors or the mean."""
    spec = SPECS[competition_id]
    target = build(competition_id).target
    return _HEAD.format(target=target) + "\n" + _BASELINES[spec.metric].format(classes=_classes(competition_id))


def strong_program(competition_id: str) -> str:
    """A tuned classical model: what "best" (normalised score 1) means for this competition."""
    spec = SPECS[competition_id]
    target = build(competition_id).target
    predict = _PREDICT[spec.metric].format(classes=_classes(competition_id))
    return _HEAD.format(target=target) + "\n" + _STRONG[competition_id] + predict
