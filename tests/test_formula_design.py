"""Formula front end: glmmTMB formula strings + DataFrames -> design matrices.

The reference formulas are the ``python_formula`` fields of the parity suite
(glmmTMB 1.1.5 fits); column counts and names are checked against R's
``model.matrix`` / glmmTMB's ``VarCorr`` as recorded there.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest

import tmbx
from tmbx.formula._design import Design, build_design, new_design
from tmbx.formula._parse import FormulaError, parse_formula


@lru_cache(maxsize=None)
def _load(name: str) -> pd.DataFrame:
    return tmbx.load_dataset(name)


def data(name: str) -> pd.DataFrame:
    return _load(name).copy()


def r_name(name: str) -> str:
    """formulaic's 'spp[T.PR]' -> R's 'sppPR'; 'Intercept' -> '(Intercept)'."""
    if name == "Intercept":
        return "(Intercept)"
    return re.sub(r"\[(?:T\.)?([^\]]*)\]", r"\1", name)


def build(*args, **kwargs) -> Design:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference cases build without warnings
        return build_design(*args, **kwargs)


# --------------------------------------------------------------------------- reference cases

# (case, data set, formula, ziformula, dispformula, binomial,
#  cond columns, zi columns, disp columns, [(group, structure, k, levels)])
CASES = [
    ("cake_gamma", "cake", "angle ~ recipe + temperature + (1|recipe:replicate)", None, None, False,
     8, None, 1, [("recipe:replicate", "us", 1, 45)]),
    ("cbpp_binomial", "cbpp", "cbind(incidence, size - incidence) ~ period + (1|herd)", None, None, True,
     4, None, 1, [("herd", "us", 1, 15)]),
    ("insteval_crossed", "insteval", "y ~ service + (1|s) + (1|d) + (1|dept)", None, None, False,
     2, None, 1, [("s", "us", 1, 2972), ("d", "us", 1, 1128), ("dept", "us", 1, 14)]),
    ("orthodont_ar1", "orthodont", "distance ~ age + Sex + ar1(C(age) + 0|Subject)", None, None, False,
     3, None, 1, [("Subject", "ar1", 4, 27)]),
    ("owls_zinb1", "owls", "SiblingNegotiation ~ FoodTreatment*SexParent + offset(logBroodSize) + (1|Nest)",
     "~1", None, False, 4, 1, 1, [("Nest", "us", 1, 27)]),
    ("penicillin_crossed", "penicillin", "diameter ~ 1 + (1|plate) + (1|sample)", None, None, False,
     1, None, 1, [("plate", "us", 1, 24), ("sample", "us", 1, 6)]),
    ("salamanders_cs", "salamanders", "count ~ spp + mined + cs(spp + 0|site)", None, None, False,
     8, None, 1, [("site", "cs", 7, 23)]),
    ("salamanders_hurdle_nb2", "salamanders", "count ~ spp + mined + (1|site)", "~spp + mined", None, False,
     8, 8, 1, [("site", "us", 1, 23)]),
    ("salamanders_rr", "salamanders", "count ~ spp + mined + rr(spp + 0|site, d = 1)", None, None, False,
     8, None, 1, [("site", "rr", 7, 23)]),
    ("salamanders_zip", "salamanders", "count ~ spp * mined + (1|site)", "~spp * mined", None, False,
     14, 14, 1, [("site", "us", 1, 23)]),
    ("sleepstudy_diag", "sleepstudy", "Reaction ~ Days + diag(Days|Subject)", None, None, False,
     2, None, 1, [("Subject", "diag", 2, 18)]),
    ("sleepstudy_disp", "sleepstudy", "Reaction ~ Days + (1|Subject)", None, "~Days", False,
     2, None, 2, [("Subject", "us", 1, 18)]),
    ("sleepstudy_us", "sleepstudy", "Reaction ~ Days + (Days|Subject)", None, None, False,
     2, None, 1, [("Subject", "us", 2, 18)]),
    ("topo_exp", "topo", "z ~ 1 + exp(pos(x, y) + 0|group)", None, None, False,
     1, None, 1, [("group", "exp", 52, 1)]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_case_builds(case):
    _, ds, f, zi, disp, binom, p_cond, p_zi, p_disp, terms = case
    df = data(ds)
    d = build(f, df, ziformula=zi, dispformula=disp, family_needs_trials=binom)
    n = len(df)
    assert d.nobs == n and d.y.shape == (n,) and d.dropped.size == 0
    assert d.components["cond"].X.shape == (n, p_cond)
    assert d.components["cond"].names[0] == "Intercept"
    assert ("zi" in d.components) == (p_zi is not None)
    if p_zi is not None:
        assert d.components["zi"].X.shape == (n, p_zi)
    assert d.components["disp"].X.shape == (n, p_disp)
    got = [(r.group, r.structure, len(r.terms), len(r.levels)) for r in d.components["cond"].re]
    assert got == terms
    for r in d.components["cond"].re:
        assert r.Z.shape == (n, len(r.terms)) and r.Z.dtype == np.float64
        assert r.index.dtype == np.int32 and r.index.min() == 0 and r.index.max() == len(r.levels) - 1


def test_salamanders_interaction_matches_r_model_matrix():
    df = data("salamanders")
    d = build("count ~ spp * mined + (1|site)", df, ziformula="~spp * mined")
    r_names = ["(Intercept)", "sppPR", "sppDM", "sppEC-A", "sppEC-L", "sppDES-L", "sppDF", "minedno",
               "sppPR:minedno", "sppDM:minedno", "sppEC-A:minedno", "sppEC-L:minedno",
               "sppDES-L:minedno", "sppDF:minedno"]
    for comp in ("cond", "zi"):
        assert [r_name(c) for c in d.components[comp].names] == r_names
    X, names = d.components["cond"].X, d.components["cond"].names
    row = np.flatnonzero((df["spp"] == "PR") & (df["mined"] == "no"))[0]
    expect = {"Intercept", "spp[T.PR]", "mined[T.no]", "spp[T.PR]:mined[T.no]"}
    np.testing.assert_array_equal(X[row], [1.0 if c in expect else 0.0 for c in names])
    assert X[:, 1:].sum() == ((df["spp"] != "GP").sum() + (df["mined"] == "no").sum()
                              + ((df["spp"] != "GP") & (df["mined"] == "no")).sum())


def test_owls_names_and_offset():
    df = data("owls")
    d = build("SiblingNegotiation ~ FoodTreatment*SexParent + offset(logBroodSize) + (1|Nest)", df, ziformula="~1")
    assert [r_name(c) for c in d.components["cond"].names] == [
        "(Intercept)", "FoodTreatmentSatiated", "SexParentMale", "FoodTreatmentSatiated:SexParentMale"]
    np.testing.assert_allclose(d.components["cond"].offset, df["logBroodSize"])
    np.testing.assert_array_equal(d.components["zi"].offset, 0.0)
    np.testing.assert_array_equal(d.components["zi"].X, 1.0)
    np.testing.assert_array_equal(d.y, df["SiblingNegotiation"])


def test_cbpp_cbind_response():
    df = data("cbpp")
    d = build("cbind(incidence, size - incidence) ~ period + (1|herd)", df, family_needs_trials=True)
    np.testing.assert_array_equal(d.y, df["incidence"])
    np.testing.assert_array_equal(d.trials, df["size"])
    np.testing.assert_array_equal(d.weights, 1.0)
    assert d.response_name == "cbind(incidence, size - incidence)"
    assert [r_name(c) for c in d.components["cond"].names] == ["(Intercept)", "period2", "period3", "period4"]


def test_sleepstudy_random_slope_columns_and_levels():
    df = data("sleepstudy")
    d = build("Reaction ~ Days + (Days|Subject)", df)
    (r,) = d.components["cond"].re
    assert r.terms == ["Intercept", "Days"] and r.structure == "us" and r.group == "Subject"
    np.testing.assert_array_equal(r.Z, np.column_stack([np.ones(len(df)), df["Days"]]))
    assert r.levels == list(df["Subject"].cat.categories) and len(r.levels) == 18
    np.testing.assert_array_equal(r.index, df["Subject"].cat.codes)
    np.testing.assert_array_equal(d.components["cond"].X, r.Z)


def test_cake_interaction_group():
    df = data("cake")
    d = build("angle ~ recipe + temperature + (1|recipe:replicate)", df)
    (r,) = d.components["cond"].re
    assert len(r.levels) == 45 and r.levels[:3] == ["A:1", "A:2", "A:3"] and r.levels[15] == "B:1"
    labels = (df["recipe"].astype(str) + ":" + df["replicate"].astype(str)).to_numpy()
    np.testing.assert_array_equal(np.asarray(r.levels)[r.index], labels)
    assert [r_name(c) for c in d.components["cond"].names][3:] == [
        "temperature185", "temperature195", "temperature205", "temperature215", "temperature225"]


def test_orthodont_ar1_indicator_columns():
    df = data("orthodont")
    d = build("distance ~ age + Sex + ar1(C(age) + 0|Subject)", df)
    (r,) = d.components["cond"].re
    assert r.terms == ["C(age)[8]", "C(age)[10]", "C(age)[12]", "C(age)[14]"]
    np.testing.assert_array_equal(r.Z, (df["age"].to_numpy()[:, None] == [8, 10, 12, 14]).astype(float))
    assert [r_name(c) for c in d.components["cond"].names] == ["(Intercept)", "age", "SexFemale"]


def test_topo_exp_coordinates():
    df = data("topo")
    d = build("z ~ 1 + exp(pos(x, y) + 0|group)", df)
    (r,) = d.components["cond"].re
    assert len(r.terms) == 52 and r.levels == ["a"]
    # glmmTMB's numFactor order and labels (from the reference VarCorr)
    assert r.terms[:4] == ["pos(3.1,0)", "pos(1.4,0.1)", "pos(6,0.1)", "pos(2.3,0.3)"]
    assert r.terms[-2:] == ["pos(3.6,6.2)", "pos(5.7,6.2)"]
    coords = r.args["coords"]
    assert coords.shape == (52, 2)
    np.testing.assert_allclose(coords[:3], [[3.1, 0.0], [1.4, 0.1], [6.0, 0.1]])
    np.testing.assert_array_equal(r.Z.sum(axis=1), 1.0)
    hit = r.Z.argmax(axis=1)
    np.testing.assert_allclose(coords[hit], df[["x", "y"]].to_numpy())


def test_insteval_three_crossed_terms():
    df = data("insteval")
    d = build("y ~ service + (1|s) + (1|d) + (1|dept)", df)
    re = d.components["cond"].re
    assert [r.group for r in re] == ["s", "d", "dept"]
    assert all(r.terms == ["Intercept"] and r.Z.shape == (len(df), 1) for r in re)
    assert re[2].levels == list(df["dept"].cat.categories)


# --------------------------------------------------------------------------- syntax

def test_nested_expands_as_lme4_expandslash():
    # glmmTMB 1.1.5 names (1|recipe/replicate)'s terms "replicate:recipe" and "recipe",
    # in that order (tests/data/extra_cases.json, cake_nested_reml)
    df = data("cake")
    d = build("angle ~ temp + (1|recipe/replicate)", df)
    assert [(r.group, len(r.levels)) for r in d.components["cond"].re] == [("replicate:recipe", 45), ("recipe", 3)]
    bars = parse_formula("y ~ (1|a/b/c) + (x|f*g)").bars
    assert [b.group for b in bars] == [("c", "b", "a"), ("b", "a"), ("a",), ("f",), ("g",), ("f", "g")]
    assert all(b.structure == "us" for b in bars)


def test_double_bar_is_diag_and_duplicate_groups_are_numbered():
    df = data("sleepstudy")
    d = build("Reaction ~ Days + (1|Subject) + (0 + Days|Subject) + (Days||Subject)", df)
    got = [(r.group, r.structure, r.terms) for r in d.components["cond"].re]
    assert got == [("Subject", "us", ["Intercept"]), ("Subject.1", "us", ["Days"]),
                   ("Subject.2", "diag", ["Intercept", "Days"])]


def test_structure_arguments():
    sal = data("salamanders")
    M = np.diag(np.arange(1.0, 8.0))
    d = build("count ~ mined + rr(spp + 0|site) + rr(spp + 0|site, d = 1) + propto(0 + spp|site, M)",
              sal, env={"M": M})
    re = d.components["cond"].re
    assert [r.args.get("d") for r in re[:2]] == [2, 1] and re[0].terms[0] == "spp[GP]"
    np.testing.assert_array_equal(re[2].args["matrix"], M)
    sal.attrs["K"] = np.eye(7)
    d = build("count ~ 1 + equalto(0 + spp|site, K)", sal)
    assert d.components["cond"].re[0].args["matrix"].shape == (7, 7)
    d = build("distance ~ age + ou(pos(age) + 0|Subject)", data("orthodont"))
    (r,) = d.components["cond"].re
    assert r.terms == ["pos(8)", "pos(10)", "pos(12)", "pos(14)"]
    np.testing.assert_array_equal(r.args["times"], [8.0, 10.0, 12.0, 14.0])


def test_transformations_offsets_and_fixed_only_intercept():
    df = data("sleepstudy")
    d = build("log(Reaction) ~ I(Days^2) + offset(log(Days + 1)) + offset(Days) + (1|Subject)", df)
    np.testing.assert_allclose(d.y, np.log(df["Reaction"]))
    np.testing.assert_allclose(d.components["cond"].X[:, 1], df["Days"] ** 2)  # R's ^ is a power
    np.testing.assert_allclose(d.components["cond"].offset, np.log(df["Days"] + 1) + df["Days"])
    d = build("Reaction ~ (1|Subject)", df, offset=np.full(len(df), 2.0))
    assert d.components["cond"].names == ["Intercept"]
    np.testing.assert_array_equal(d.components["cond"].offset, 2.0)
    d = build("Reaction ~ 0 + Days + (1|Subject)", df, ziformula="~0")
    assert d.components["cond"].names == ["Days"] and set(d.components) == {"cond", "disp"}


def test_binomial_proportion_with_weights():
    df = data("cbpp").assign(p=lambda x: x["incidence"] / x["size"])
    d = build("p ~ period + (1|herd)", df, weights="size", family_needs_trials=True)
    np.testing.assert_allclose(d.y, df["incidence"])
    np.testing.assert_array_equal(d.trials, df["size"])
    np.testing.assert_array_equal(d.weights, 1.0)


def test_binomial_factor_response_and_zi_random_effects():
    df = data("cbpp")
    df["any"] = pd.Categorical(np.where(df["incidence"] > 0, "yes", "no"), categories=["no", "yes"])
    d = build("any ~ period + (1|herd)", df, family_needs_trials=True)
    np.testing.assert_array_equal(d.y, (df["incidence"] > 0).astype(float))
    np.testing.assert_array_equal(d.trials, 1.0)
    sal = data("salamanders")
    d = build("count ~ spp + (1|site)", sal, ziformula="~mined + (1|site)")
    zi = d.components["zi"]
    assert zi.names == ["Intercept", "mined[T.no]"] and zi.formula == "~mined + (1|site)"
    assert [(r.group, len(r.levels)) for r in zi.re] == [("site", 23)]


# --------------------------------------------------------------------------- data problems

def test_missing_values_dropped_with_warning_or_fail():
    df = data("sleepstudy")
    df.loc[[3, 10], "Days"] = np.nan
    df["unused"] = np.nan
    with pytest.warns(UserWarning, match=r"2 of 180 rows dropped.*'Days' \(2\)"):
        d = build_design("Reaction ~ Days + (1|Subject)", df)
    assert d.nobs == 178 and list(d.dropped) == [3, 10] and len(d.data) == 178
    assert d.components["cond"].re[0].Z.shape == (178, 1)
    with pytest.raises(ValueError, match="Missing values in 'Days'"):
        build_design("Reaction ~ Days + (1|Subject)", df, na_action="fail")


def test_rank_deficient_columns_dropped():
    df = data("sleepstudy").assign(D2=lambda x: 2.0 * x["Days"], one=1.0)
    with pytest.warns(UserWarning, match="rank deficient; dropping column.*D2, one"):
        d = build_design("Reaction ~ Days + D2 + one + (1|Subject)", df)
    assert d.components["cond"].names == ["Intercept", "Days"] and d.components["cond"].X.shape == (180, 2)


ERRORS = [
    ("Reaction ~ Dys + (Days|Subject)", r"Unknown column 'Dys'.*Did you mean 'Days'"),
    ("Reaction ~ Days + (Days|Subject", r"never closed\.\n.*\n\s{22}\^"),
    ("Reaction ~ Days + (Days|Subject) + foo", r"Unknown column 'foo'"),
    ("Reaction ~ Days + Days|Subject", r"must be in parentheses"),
    ("Reaction ~ Days + (1|Subjct)", r"Unknown grouping column 'Subjct'.*Did you mean 'Subject'"),
    ("Reaction ~ Days + ar1(Days + 0|Subject)", r"ar1\(\) needs a factor.*'Days' is numeric.*C\(Days\)"),
    ("Reaction ~ Days + arl(Days + 0|Subject)", r"unknown covariance structure 'arl'.*Did you mean 'ar1'"),
    ("Reaction ~ Days + exp(Days + 0|Subject)", r"exp\(\) needs coordinates"),
    ("Reaction ~ Days + rr(Days|Subject, d = 3)", r"cannot exceed the 2 columns"),
    ("Reaction ~ Days + propto(Days|Subject, M)", r"Matrix 'M' for propto\(\) not found"),
    ("~ Days + (1|Subject)", r"no response"),
    ("Reactionn ~ Days", r"Unknown column 'Reactionn'"),
    ("cbind(Reaction, Days, Days) ~ 1", r"cbind\(\) takes exactly two arguments.*got 3"),
    ("Subject ~ Days", r"response 'Subject' is not numeric"),
    ("Reaction ~ Days + x*(1|Subject)", r"must stand alone"),
    ("Reaction ~ Days + ", r"a term is missing"),
    ("Reaction ~ Days ~ 1", r"more than one '~'"),
]


@pytest.mark.parametrize("formula,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_clear(formula, message):
    with pytest.raises(FormulaError, match=message):
        build_design(formula, data("sleepstudy"))


def test_caret_points_at_problem():
    with pytest.raises(FormulaError) as info:
        build_design("Reaction ~ Days + (1 | Subjct)", data("sleepstudy"))
    lines = str(info.value).splitlines()
    assert lines[-2].strip() == "Reaction ~ Days + (1 | Subjct)"
    assert lines[-1].index("^") == lines[-2].index("Subjct")


def test_single_level_group_and_dispformula_errors():
    df = data("sleepstudy").assign(one="a")
    with pytest.raises(FormulaError, match="'one' has a single level"):
        build_design("Reaction ~ Days + (1|one)", df)
    with pytest.raises(FormulaError, match="dispformula takes fixed effects only"):
        build_design("Reaction ~ Days", df, dispformula="~ Days + (1|Subject)")
    with pytest.raises(FormulaError, match="binomial response must be 0/1"):
        build_design("Reaction ~ Days", df, family_needs_trials=True)


# --------------------------------------------------------------------------- new data

def test_new_design_known_and_unseen_levels():
    df = data("sleepstudy")
    d = build("Reaction ~ Days + (Days|Subject)", df, dispformula="~Days")
    new = pd.DataFrame({"Days": [0.0, 3.0, 9.0],
                        "Subject": pd.Categorical(["308", "999", "372"])})
    nd = new_design(d, new)
    assert nd.y is None and nd.nobs == 3
    (r,) = nd.components["cond"].re
    assert list(r.index) == [0, -1, 17] and r.levels == d.components["cond"].re[0].levels
    np.testing.assert_array_equal(r.Z, [[1, 0], [1, 3], [1, 9]])
    # known rows give the same X as in fitting
    rows = [0, 13, 179]
    same = new_design(d, df.iloc[rows])
    for comp in ("cond", "disp"):
        np.testing.assert_array_equal(same.components[comp].X, d.components[comp].X[rows])
    np.testing.assert_array_equal(same.components["cond"].re[0].index, d.components["cond"].re[0].index[rows])
    np.testing.assert_array_equal(same.y, df["Reaction"].to_numpy()[rows])
    with pytest.raises(ValueError, match="not seen in fitting.*999"):
        new_design(d, new, allow_new_levels=False)


def test_new_design_factor_columns_and_offsets():
    df = data("salamanders")
    d = build("count ~ spp + mined + (1|site)", df, ziformula="~spp")
    new = df.iloc[[5, 100, 400]].copy()
    new["site"] = pd.Categorical(["R-1", "nowhere", "VF-2"])
    nd = new_design(d, new.drop(columns="count"))
    np.testing.assert_array_equal(nd.components["cond"].X, d.components["cond"].X[[5, 100, 400]])
    np.testing.assert_array_equal(nd.components["zi"].X, d.components["zi"].X[[5, 100, 400]])
    assert nd.components["cond"].re[0].index[1] == -1
    bad = new.assign(spp=pd.Categorical(["GP", "XX", "PR"]))
    with pytest.raises(FormulaError, match="not seen in fitting"):
        new_design(d, bad)
    owls = data("owls")
    d = build("SiblingNegotiation ~ FoodTreatment + offset(logBroodSize) + (1|Nest)", owls)
    nd = new_design(d, owls.iloc[:4])
    np.testing.assert_allclose(nd.components["cond"].offset, owls["logBroodSize"].iloc[:4])


def test_new_design_ar1_and_coordinates():
    o = data("orthodont")
    d = build("distance ~ age + Sex + ar1(C(age) + 0|Subject)", o)
    nd = new_design(d, o.iloc[:8])
    np.testing.assert_array_equal(nd.components["cond"].re[0].Z, d.components["cond"].re[0].Z[:8])
    t = data("topo")
    d = build("z ~ 1 + exp(pos(x, y) + 0|group)", t)
    nd = new_design(d, t.iloc[[7, 2]])
    np.testing.assert_array_equal(nd.components["cond"].re[0].Z, d.components["cond"].re[0].Z[[7, 2]])


def test_level_labels_are_r_as_character():
    """Factor levels are labelled as R's ``as.character`` writes them, whatever
    the column's type: strings as they are (taken whole, not value by value:
    700,000 levels of a crossed design), integers without a decimal point,
    doubles with 15 significant digits, logicals as TRUE/FALSE, and a mixed
    object column value by value."""
    from tmbx.formula._groups import r_labels

    assert r_labels(pd.Index(["b", "a 1", ""])) == ["b", "a 1", ""]
    assert r_labels(np.array(["x", "y"])) == ["x", "y"]
    assert r_labels(np.array([3, 10])) == ["3", "10"]
    assert r_labels(np.array([1.0, 2.5, 0.1 + 0.2])) == ["1", "2.5", "0.3"]
    assert r_labels(np.array([True, False])) == ["TRUE", "FALSE"]
    assert r_labels(pd.Index(["a", 1, 2.5, True], dtype=object)) == ["a", "1", "2.5", "TRUE"]
