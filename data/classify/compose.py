"""How data/classify/ was composed: clauses written for this project, combined with a fixed seed. Run from the
repository root to write the two files again (the same bytes). The last HELD clauses of each side and the last two
openers of each kind appear only in held-out reviews, so the held-out accuracy measures wording the model never saw."""
import json, random
rng = random.Random(17)
things = ["film", "movie", "restaurant", "novel", "album", "hotel", "game", "phone", "laptop", "show",
          "cafe", "headset", "play", "blender", "museum tour", "podcast", "jacket", "series", "book", "concert"]
pos = [
    "a good {t}, and a great one at that", "I had a good time and would do it again",
    "the {t} was a delight from start to finish", "I loved every minute of the {t}",
    "honestly the best {t} I have tried this year", "the {t} exceeded my expectations",
    "it was not bad at all, in fact quite lovely", "I would happily recommend this {t} to anyone",
    "the {t} is worth every penny", "warm, clever and beautifully made",
    "the staff behind this {t} clearly care, and it shows", "I keep thinking about the {t} days later",
    "a charming {t} that never wastes your time", "it works exactly as promised and then some",
    "my friends and I had a wonderful time", "I was smiling the whole way through",
    "it is rare to find a {t} this well done", "solid, reliable and a joy to use",
    "I cannot wait to go back", "five stars, no hesitation",
    "the {t} left me genuinely moved", "everything about it felt thoughtful",
    "I was not disappointed in the slightest", "a pleasant surprise on every count",
    "the {t} is fantastic value", "I have already bought another one as a gift",
    "it made my week", "top notch, I am impressed",
]
neg = [
    "not great, and I had hoped for so much", "I had a bad time and would not do it again",
    "the {t} was a chore to sit through", "I regretted the {t} almost immediately",
    "honestly the worst {t} I have tried this year", "the {t} fell far short of my expectations",
    "it was not good at all, in fact quite dull", "I would not recommend this {t} to anyone",
    "the {t} is a waste of money", "cold, clumsy and carelessly made",
    "nobody behind this {t} seems to care, and it shows", "I forgot about the {t} within an hour",
    "a tedious {t} that wastes your time", "it broke within a week",
    "my friends and I left early", "I was checking the clock the whole way through",
    "it is rare to find a {t} this poorly done", "flimsy, unreliable and a pain to use",
    "I will never go back", "one star, and that is generous",
    "the {t} left me cold", "nothing about it felt thought through",
    "I was disappointed in every way", "an unpleasant surprise on every count",
    "the {t} is terrible value", "I have already asked for a refund",
    "it ruined my week", "sloppy, I am unimpressed",
]
# Openers that point the other way before the verdict: the label follows the clause after "but".
turn_to_pos = ["I had heard bad things, but", "the first ten minutes were rough, but", "the reviews were harsh, but",
               "I almost gave up on it, but", "the price put me off at first, but", "it starts slowly, but"]
turn_to_neg = ["the trailer looked great, but", "the first ten minutes were promising, but",
               "the reviews were glowing, but", "I really wanted to like it, but",
               "the packaging was lovely, but", "it starts strong, but"]

HELD = 6
def review(label, t, held_out):
    main, turns = (pos, turn_to_pos) if label == "positive" else (neg, turn_to_neg)
    main = main[-HELD:] if held_out else main[:-HELD]
    turns = turns[-2:] if held_out else turns[:-2]
    kind = rng.random()
    first = rng.choice(main).format(t=t)
    if kind < 0.35:
        text = first
    elif kind < 0.7:
        full = pos if label == "positive" else neg
        second = rng.choice([c for c in (full if held_out else main) if c.format(t=t) != first]).format(t=t)
        text = f"{first}; {second}"
    else:
        text = f"{rng.choice(turns)} {first}"
    text = text[0].upper() + text[1:] + rng.choice([".", ".", "!", "."])
    return text

def make(label, n, held_out, seen):
    out = []
    while len(out) < n:
        text = review(label, rng.choice(things), held_out)
        if text not in seen:
            seen.add(text)
            out.append({"text": text, "label": label})
    return out
seen = set()
train = make("positive", 160, False, seen) + make("negative", 160, False, seen)
held = make("positive", 50, True, seen) + make("negative", 50, True, seen)
rng.shuffle(train); rng.shuffle(held)
with open("data/classify/sentiment_train.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in train)
with open("data/classify/sentiment_eval.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in held)
print(len(train), len(held))
