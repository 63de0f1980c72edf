"""The plan a recipe makes of a method: which jobs train, what students learn from, what composes into
the evaluated models. Pure functions, checked against hand-written expectations."""
from types import SimpleNamespace

import pytest

from tasks.steps.plan import RECIPES, Composition, Job, plan


def spec(recipe):
    return SimpleNamespace(recipe=recipe)


def test_distill_trains_one_teacher_then_both_students_on_every_seed():
    p = plan(spec("distill"), [3, 1, 4], lambda role: [None])
    assert p.teachers == (Job("teacher", 3, None),)
    assert p.teacher_models == (Composition("teacher", 3, (("teacher", 3, None),)),)
    assert p.students == (Job("student_kd", 3, None, ("teacher", 3, None)), Job("student_kd", 1, None, ("teacher", 3, None)),
                          Job("student_kd", 4, None, ("teacher", 3, None)), Job("student_labels", 3, None),
                          Job("student_labels", 1, None), Job("student_labels", 4, None))
    assert [(m.role, m.seed) for m in p.student_models] == [("student_kd", 3), ("student_kd", 1), ("student_kd", 4),
                                                             ("student_labels", 3), ("student_labels", 1),
                                                             ("student_labels", 4)]
    assert len(p.jobs) == 7 and len(p.models) == 7


def test_a_forecast_student_learns_the_teachers_matching_lead():
    units = {"teacher": [6, 24], "student_kd": [6], "student_labels": [6]}
    p = plan(spec("distill"), [0, 1], units.__getitem__)
    assert [j.key for j in p.teachers] == [("teacher", 0, 6), ("teacher", 0, 24)]
    assert p.teacher_models[0].members == (("teacher", 0, 6), ("teacher", 0, 24))
    assert {j.teacher for j in p.students if j.role == "student_kd"} == {("teacher", 0, 6)}
    assert all(m.members == ((m.role, m.seed, 6),) for m in p.student_models)


def test_teacher_only_trains_a_teacher_per_seed_and_derived_models_per_seed():
    p = plan(spec("teacher_only"), [0, 1], lambda role: [1, 6, 24], [("iterated_1h", "teacher", (1,))])
    assert [j.key for j in p.teachers] == [("teacher", s, u) for s in (0, 1) for u in (1, 6, 24)]
    assert p.teacher_models == (
        Composition("teacher", 0, (("teacher", 0, 1), ("teacher", 0, 6), ("teacher", 0, 24))),
        Composition("iterated_1h", 0, (("teacher", 0, 1),)),
        Composition("teacher", 1, (("teacher", 1, 1), ("teacher", 1, 6), ("teacher", 1, 24))),
        Composition("iterated_1h", 1, (("teacher", 1, 1),)))
    assert p.students == () and p.student_models == ()


def test_every_composition_is_made_of_trained_units():
    for recipe, units in (("distill", {"teacher": [6, 24], "student_kd": [6], "student_labels": [6]}),
                          ("teacher_only", {"teacher": [1, 6, 24]}),
                          ("compare", {"teacher": [None], "student_labels": [None]})):
        p = plan(spec(recipe), [0, 1, 2], units.__getitem__, [("iterated_1h", "teacher", (1,))] if recipe == "teacher_only" else [])
        trained = {j.key for j in p.jobs}
        assert all(set(m.members) <= trained for m in p.models)


def test_impossible_plans_are_refused():
    with pytest.raises(ValueError, match="iterated_1h needs teacher units \\[1\\]"):
        plan(spec("teacher_only"), [0], lambda role: [6, 24], [("iterated_1h", "teacher", (1,))])
    with pytest.raises(ValueError, match="untrained teacher units"):
        plan(spec("distill"), [0], {"teacher": [24], "student_kd": [6], "student_labels": [6]}.__getitem__)
    with pytest.raises(ValueError, match="at least one seed"):
        plan(spec("distill"), [], lambda role: [None])
    assert set(RECIPES) == {"distill", "teacher_only", "compare"}


def test_compare_trains_the_reference_and_the_labels_only_student_on_every_seed():
    p = plan(spec("compare"), [0, 1, 2], lambda role: [None])
    assert [j.key for j in p.teachers] == [("teacher", s, None) for s in (0, 1, 2)]
    assert [j.key for j in p.students] == [("student_labels", s, None) for s in (0, 1, 2)]
    assert all(j.teacher is None for j in p.students)  # nothing distilled
    assert [(m.role, m.seed) for m in p.models] == [(r, s) for r in ("teacher", "student_labels") for s in (0, 1, 2)]
