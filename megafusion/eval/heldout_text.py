"""Fixed text for the text-side checks: prompts for the greedy-identity check and paragraphs for perplexity.

Written for this package (plain encyclopaedic prose on varied topics), so no model could have trained on
exactly these paragraphs and the numbers stay comparable between runs and versions."""

from __future__ import annotations

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a handwritten digit is.",
)

PARAGRAPHS: tuple[str, ...] = (
    "Rivers shape the land they cross. Over thousands of years, moving water carries sand and small stones "
    "downstream, cutting valleys into rock and building wide plains where the current slows. Many early towns "
    "grew beside rivers because the water supported farming, trade and travel.",
    "A bicycle turns the push of a rider's legs into motion. The pedals drive a chain that spins the rear wheel, "
    "and a set of gears lets the rider trade speed for force when the road climbs. Because it needs no fuel, the "
    "bicycle remains one of the most efficient ways to travel short distances.",
    "Bread is made by mixing flour, water, salt and yeast into a dough. The yeast feeds on sugars in the flour and "
    "releases gas, which makes the dough rise. Baking sets the structure, browns the crust and fills the kitchen "
    "with a smell that most people find hard to resist.",
    "The night sky changes with the seasons. As the Earth travels around the Sun, different stars are visible "
    "after sunset, so the constellations that stand high in winter are hidden in summer. Sailors once used these "
    "regular patterns to find their way across the open ocean.",
    "Libraries collect books, maps, recordings and newspapers so that anyone can read them. A good catalogue "
    "lets visitors find a single page among millions, and librarians help people learn how to search. Many "
    "libraries now lend digital books and offer free access to the internet as well.",
    "Honeybees live in colonies of many thousands. Worker bees gather nectar and pollen, build wax combs and care "
    "for the young, while a single queen lays the eggs. A bee that finds flowers can tell the others where they "
    "are by performing a short dance inside the hive.",
)
