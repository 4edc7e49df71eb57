"""The blind-index terms shared by FHIR search and C-FIND."""

from engine.security import blind_index as bi

K1, K2 = b"k" * 32, b"j" * 32


def test_normalise_folds_case_accents_and_separators():
    assert bi.normalise("  Müller^Ana-María  ") == "muller ana maria"
    assert bi.words("DOE^JANE^^DR=Doe^Jane") == ["doe", "jane", "dr"]


def test_equal_values_give_equal_terms_and_scopes_and_keys_separate_them():
    assert bi.exact_term(K1, "Patient.family", "Müller") == bi.exact_term(K1, "Patient.family", "MULLER")
    assert bi.exact_term(K1, "Patient.family", "Doe") != bi.exact_term(K1, "Patient.given", "Doe")
    assert bi.exact_term(K1, "Patient.family", "Doe") != bi.exact_term(K2, "Patient.family", "Doe")


def test_prefix_query_finds_indexed_words_and_says_when_to_recheck():
    stored = bi.index_terms(K1, "n", "Johnson^Elizabeth")
    t, recheck = bi.prefix_query(K1, "n", "eliz")
    assert t in stored and not recheck
    t, recheck = bi.prefix_query(K1, "n", "Elizabet")  # exactly MAX_PREFIX
    assert t in stored and not recheck
    t, recheck = bi.prefix_query(K1, "n", "Elizabeth")  # longer: candidates, then re-check
    assert t in stored and recheck
    assert bi.prefix_query(K1, "n", "smi")[0] not in stored
    assert bi.prefix_query(K1, "n", " ^ ") == (None, True)
    assert not bi.index_terms(K1, "n", "")
