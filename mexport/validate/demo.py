"""The demo question sets: templated MCQs over one fact table, written in each dataset's own schema.

Forty hand-written sample questions per task cannot resolve a parity margin of a few points: with no flipped
question the paired CI on n questions is still ±z²/(n + z²) (±8.8 points at n = 40). The demo sets give each task
200 questions, generated from :data:`FACTS` (an infection, its cause, first-line treatment, hallmark finding and
main site) with task-specific templates, so the learned fixture can learn them and the README demo ends in real
verdicts. Each question's wrong options mix "hard" distractors (the same relation of another infection: only a
model that binds the fact to the infection rules them out) with "easy" ones that never answer any question
(:data:`NEVER_CORRECT`), so a tiny model reaches a high but not saturated accuracy, with answers that lossy
quantization can genuinely disturb. They ship as ``data/{task}_demo.jsonl`` (``--data TASK=demo``);
``python -m mexport.validate.demo`` rewrites them, and a test checks the shipped files are exactly what this code
generates.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mexport.validate.tasks import TASKS

SEED = 20261201
RELATIONS = ("cause", "treatment", "finding", "site")

# infection: (cause, first-line treatment, hallmark finding, main site)
FACTS: dict[str, tuple[str, str, str, str]] = {
    "falciparum malaria": (
        "Plasmodium falciparum",
        "artemether-lumefantrine",
        "cyclic fever with rigors",
        "red blood cells",
    ),
    "pulmonary tuberculosis": (
        "Mycobacterium tuberculosis",
        "rifampicin-isoniazid regimen",
        "chronic cough with night sweats",
        "lung apices",
    ),
    "typhoid fever": ("Salmonella Typhi", "azithromycin", "rose spots on the trunk", "Peyer patches"),
    "cholera": ("Vibrio cholerae", "oral rehydration solution", "rice-water stools", "small bowel lumen"),
    "syphilis": ("Treponema pallidum", "benzathine penicillin", "painless genital chancre", "genital mucosa"),
    "gonorrhoea": ("Neisseria gonorrhoeae", "ceftriaxone injection", "purulent urethral discharge", "urethra"),
    "urinary schistosomiasis": ("Schistosoma haematobium", "praziquantel", "terminal haematuria", "bladder wall"),
    "onchocerciasis": ("Onchocerca volvulus", "ivermectin", "itchy skin nodules", "eyes and skin"),
    "leprosy": (
        "Mycobacterium leprae",
        "rifampicin-dapsone-clofazimine",
        "anaesthetic skin patches",
        "peripheral nerves",
    ),
    "herpes zoster": ("varicella-zoster virus", "aciclovir", "dermatomal vesicular rash", "sensory ganglia"),
    "chronic hepatitis B": ("hepatitis B virus", "tenofovir", "positive surface antigen", "hepatocytes"),
    "giardiasis": ("Giardia lamblia", "tinidazole", "greasy foul-smelling diarrhoea", "duodenum"),
    "visceral leishmaniasis": ("Leishmania donovani", "liposomal amphotericin B", "massive splenomegaly", "spleen"),
    "sleeping sickness": (
        "Trypanosoma brucei gambiense",
        "fexinidazole",
        "daytime somnolence",
        "central nervous system",
    ),
    "Chagas disease": ("Trypanosoma cruzi", "benznidazole", "unilateral eyelid swelling", "heart muscle"),
    "oral thrush": ("Candida albicans", "nystatin suspension", "white removable plaques", "oral mucosa"),
    "cryptococcal meningitis": (
        "Cryptococcus neoformans",
        "amphotericin with flucytosine",
        "india ink capsules",
        "meninges",
    ),
    "tetanus": (
        "Clostridium tetani",
        "tetanus immunoglobulin",
        "trismus and risus sardonicus",
        "inhibitory interneurons",
    ),
    "diphtheria": ("Corynebacterium diphtheriae", "diphtheria antitoxin", "grey adherent pseudomembrane", "pharynx"),
    "pertussis": ("Bordetella pertussis", "clarithromycin", "inspiratory whoop", "ciliated airway epithelium"),
    "Lyme disease": ("Borrelia burgdorferi", "doxycycline", "erythema migrans", "skin and joints"),
    "scabies": ("Sarcoptes scabiei", "permethrin cream", "burrows with nocturnal itch", "epidermis"),
    "neurocysticercosis": ("Taenia solium", "albendazole", "seizures with brain cysts", "brain parenchyma"),
    "rabies": ("rabies lyssavirus", "post-exposure vaccination", "hydrophobia", "brainstem neurons"),
    "measles": ("measles morbillivirus", "vitamin A supplementation", "Koplik spots", "respiratory epithelium"),
    "mumps": ("mumps orthorubulavirus", "supportive analgesia", "parotid swelling", "parotid glands"),
    "dengue": ("dengue virus", "careful fluid management", "retro-orbital headache", "capillary endothelium"),
    "cystitis": ("Escherichia coli", "nitrofurantoin", "dysuria with frequency", "bladder mucosa"),
    "streptococcal pharyngitis": ("Streptococcus pyogenes", "penicillin V", "tonsillar exudate", "tonsils"),
    "pneumococcal pneumonia": ("Streptococcus pneumoniae", "amoxicillin", "rusty sputum", "lung alveoli"),
    "meningococcal disease": (
        "Neisseria meningitidis",
        "intravenous ceftriaxone",
        "non-blanching petechial rash",
        "leptomeninges",
    ),
    "cutaneous anthrax": ("Bacillus anthracis", "ciprofloxacin", "painless black eschar", "dermis"),
    "bubonic plague": ("Yersinia pestis", "gentamicin", "tender bubo", "lymph nodes"),
    "brucellosis": (
        "Brucella melitensis",
        "doxycycline with rifampicin",
        "undulant fever",
        "reticuloendothelial system",
    ),
    "trichomoniasis": ("Trichomonas vaginalis", "metronidazole", "strawberry cervix", "vaginal epithelium"),
    "cerebral toxoplasmosis": (
        "Toxoplasma gondii",
        "pyrimethamine-sulfadiazine",
        "ring-enhancing brain lesions",
        "basal ganglia",
    ),
    "peptic ulcer disease": (
        "Helicobacter pylori",
        "clarithromycin triple therapy",
        "epigastric pain relieved by food",
        "gastric antrum",
    ),
    "pseudomembranous colitis": ("Clostridioides difficile", "oral fidaxomicin", "yellow colonic plaques", "colon"),
    "botulism": (
        "Clostridium botulinum",
        "botulinum antitoxin",
        "descending flaccid paralysis",
        "neuromuscular junction",
    ),
    "leptospirosis": ("Leptospira interrogans", "intravenous penicillin", "conjunctival suffusion", "kidneys"),
    "lymphatic filariasis": (
        "Wuchereria bancrofti",
        "diethylcarbamazine",
        "lower-limb lymphoedema",
        "lymphatic vessels",
    ),
    "Buruli ulcer": (
        "Mycobacterium ulcerans",
        "rifampicin with clarithromycin",
        "painless undermined ulcer",
        "subcutaneous fat",
    ),
    "hookworm disease": ("Necator americanus", "mebendazole", "iron-deficiency anaemia", "jejunal mucosa"),
    "amoebic liver abscess": (
        "Entamoeba histolytica",
        "metronidazole then paromomycin",
        "anchovy-paste pus",
        "right liver lobe",
    ),
    "yellow fever": ("yellow fever virus", "intensive supportive care", "jaundice with bleeding", "liver"),
    "Lassa fever": ("Lassa mammarenavirus", "ribavirin", "facial swelling with sore throat", "vascular endothelium"),
    "trachoma": ("Chlamydia trachomatis", "single-dose azithromycin", "inturned eyelashes", "conjunctiva"),
    "histoplasmosis": ("Histoplasma capsulatum", "itraconazole", "calcified lung granulomas", "macrophages"),
    "tinea capitis": ("Trichophyton tonsurans", "oral griseofulvin", "scaly patches of hair loss", "scalp hair"),
    "infectious mononucleosis": (
        "Epstein-Barr virus",
        "rest and fluids",
        "posterior cervical lymphadenopathy",
        "B lymphocytes",
    ),
}

# plausible options that answer no question, per relation
NEVER_CORRECT: dict[str, tuple[str, ...]] = {
    "cause": (
        "Staphylococcus epidermidis",
        "Lactobacillus acidophilus",
        "Bacteroides fragilis",
        "Mycoplasma hominis",
        "Aspergillus niger",
        "human rhinovirus",
        "Micrococcus luteus",
        "Saccharomyces cerevisiae",
    ),
    "treatment": (
        "oral loperamide",
        "topical hydrocortisone",
        "omeprazole",
        "cetirizine",
        "vitamin C",
        "oral iron",
        "salbutamol inhaler",
        "levothyroxine",
    ),
    "finding": (
        "bilateral pitting oedema",
        "clubbing of the fingers",
        "butterfly facial rash",
        "resting tremor",
        "heat intolerance",
        "polyuria with thirst",
        "central obesity",
        "xanthelasma",
    ),
    "site": (
        "thyroid gland",
        "adrenal cortex",
        "pancreatic islets",
        "lens of the eye",
        "articular cartilage",
        "tooth enamel",
        "pineal gland",
        "nail bed",
    ),
}

# question text per relation; {d} is the infection
_STEMS = {
    "medmcqa": {
        "cause": "The causative agent of {d} is:",
        "treatment": "Drug of choice for {d} is:",
        "finding": "A characteristic clinical finding in {d} is:",
        "site": "The main site affected in {d} is:",
    },
    "medqa": {
        "cause": "A 30-year-old patient is diagnosed with {d} after a careful history and examination. "
        "Which of the following is the most likely causal organism?",
        "treatment": "A 45-year-old patient is diagnosed with {d}. There are no drug allergies. "
        "Which of the following is the most appropriate first-line treatment?",
        "finding": "A clinician suspects {d} in a 20-year-old patient. "
        "Which of the following findings would most strongly support this diagnosis?",
        "site": "A pathologist examines tissue from a patient who died of {d}. "
        "Which of the following sites is most characteristically affected?",
    },
    "afrimedqa": {
        "cause": "Which organism causes {d}?",
        "treatment": "What is the recommended first-line treatment for {d}?",
        "finding": "Which finding is typical of {d}?",
        "site": "Which part of the body does {d} mainly affect?",
    },
}
_PUBMEDQA = {
    "yes": "In a prospective cohort, patients with {d} received {t}. Clinical cure was achieved in most patients and "
    "outcomes clearly improved compared with controls.",
    "no": "In a randomised trial, patients with {d} received {t}. Cure rates did not differ from placebo and the "
    "drug showed no benefit.",
    "maybe": "In a small pilot study, patients with {d} received {t}. Some patients improved, but the sample was "
    "too small and the results remain inconclusive.",
}


def _options(facts: Sequence[tuple[str, Sequence[str]]], index: int, relation: int, count: int, rng: random.Random):
    """``count`` option texts for fact ``index`` and the gold position: the true one, ``count // 2 - 1`` hard
    distractors (other infections' answers) and easy ones (answers to nothing)."""
    truth = facts[index][1][relation]
    hard = sorted({row[relation] for _, row in facts} - {truth})
    easy = NEVER_CORRECT[RELATIONS[relation]]
    n_hard = count // 2 - 1
    options = [truth, *rng.sample(hard, n_hard), *rng.sample(easy, count - 1 - n_hard)]
    rng.shuffle(options)
    return options, options.index(truth)


def _questions(count: int, rng: random.Random) -> Iterator[tuple[str, str, list[str], int]]:
    """(infection, relation name, options, gold) for every fact × relation, in a seeded order."""
    facts = list(FACTS.items())
    pairs = [(index, relation) for index in range(len(facts)) for relation in range(len(RELATIONS))]
    rng.shuffle(pairs)
    for index, relation in pairs:
        options, gold = _options(facts, index, relation, count, rng)
        yield facts[index][0], RELATIONS[relation], options, gold


def _doc_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _medmcqa(rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for disease, relation, options, gold in _questions(4, rng):
        rows.append(
            {
                "id": _doc_id(rng),
                "question": _STEMS["medmcqa"][relation].format(d=disease),
                **dict(zip(("opa", "opb", "opc", "opd"), options, strict=True)),
                "cop": gold,
                "choice_type": "single",
                "exp": f"{disease}: {relation} is {options[gold]}.",
                "subject_name": "Microbiology",
                "topic_name": relation,
            }
        )
    return rows


def _medqa(rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for disease, relation, options, gold in _questions(4, rng):
        letters = dict(zip("ABCD", options, strict=True))
        rows.append(
            {
                "question": _STEMS["medqa"][relation].format(d=disease),
                "answer": options[gold],
                "options": letters,
                "meta_info": "step1",
                "answer_idx": "ABCD"[gold],
                "metamap_phrases": [disease, relation],
            }
        )
    return rows


def _afrimedqa(rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for disease, relation, options, gold in _questions(5, rng):
        rows.append(
            {
                "sample_id": _doc_id(rng),
                "question_type": "mcq",
                "prompt": "",
                "question": _STEMS["afrimedqa"][relation].format(d=disease),
                "answer_options": json.dumps({f"option{i + 1}": text for i, text in enumerate(options)}),
                "correct_answer": f"option{gold + 1}",
                "answer_rationale": f"{disease}: {options[gold]}.",
                "tier": "expert",
                "specialty": "Infectious Disease",
                "country": "NG",
                "region_specific": "Africa",
            }
        )
    return rows


def _pubmedqa(rng: random.Random) -> list[dict[str, Any]]:
    """Four abstracts per infection: its true treatment (yes), another's (no), a pilot study of either (maybe)."""
    facts = list(FACTS.items())
    treatments = sorted({row[1] for _, row in facts})
    cases = []
    for disease, row in facts:
        wrong = rng.choice([t for t in treatments if t != row[1]])
        cases += [
            (disease, row[1], "yes"),
            (disease, wrong, "no"),
            (disease, row[1], "maybe"),
            (disease, wrong, "maybe"),
        ]
    rng.shuffle(cases)
    rows = []
    for number, (disease, treatment, decision) in enumerate(cases):
        rows.append(
            {
                "pubid": 90000000 + number,
                "question": f"Is {treatment} effective for {disease}?",
                "context": {
                    "contexts": [_PUBMEDQA[decision].format(d=disease, t=treatment)],
                    "labels": ["RESULTS"],
                    "meshes": [disease],
                },
                "long_answer": _PUBMEDQA[decision].format(d=disease, t=treatment).split(". ")[-1],
                "final_decision": decision,
            }
        )
    return rows


GENERATORS: dict[str, Callable[[random.Random], list[dict[str, Any]]]] = {
    "medmcqa": _medmcqa,
    "medqa": _medqa,
    "pubmedqa": _pubmedqa,
    "afrimedqa": _afrimedqa,
}


def demo_rows(task: str) -> list[dict[str, Any]]:
    """The demo rows of ``task`` (deterministic: seeded by the task name)."""
    return GENERATORS[task](random.Random(f"{SEED}:{task}"))


def render_demo(task: str) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in demo_rows(task))


def write_demo_files() -> list[Path]:
    """(Re)write every shipped ``{task}_demo.jsonl``."""
    paths = []
    for task in GENERATORS:
        TASKS[task].demo_path.write_text(render_demo(task), encoding="utf-8")
        paths.append(TASKS[task].demo_path)
    return paths


if __name__ == "__main__":
    for written in write_demo_files():
        print(written)
