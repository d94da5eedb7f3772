"""What the teacher is asked to write about (heal/teacher_text.py), when no prompts file is given.

A chat model (its tokenizer has a chat template) gets GENERIC_PROMPTS as user turns: everyday
requests of many kinds (explain, tell, summarise, describe, list, advise, compare, write code),
so its replies cover the registers it is served for rather than one topic. A base model whose
tokenizer adds nothing before text gets GENERIC_OPENINGS: the first words of common kinds of
text, since it has no way to start a document from nothing (one that adds a BOS starts from it).
"""

from __future__ import annotations

GENERIC_PROMPTS: tuple[str, ...] = (
    "Explain how a rainbow forms, as you would to a curious ten-year-old.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Summarize the main causes of the French Revolution in a few paragraphs.",
    "Describe a busy market in a coastal town early in the morning.",
    "What are some good habits for getting better sleep?",
    "Give me a simple recipe for a vegetable soup and explain each step.",
    "Explain the difference between weather and climate.",
    "Write a polite email asking a colleague to review a report by Friday.",
    "How does a bicycle stay upright when it is moving?",
    "Write a poem about the first snow of winter.",
    "Compare living in a big city with living in the countryside.",
    "Explain what a binary search is and write it in Python.",
    "What should I pack for a week-long hiking trip in the mountains?",
    "Describe how bread rises, step by step.",
    "Tell me about the history of the printing press and why it mattered.",
    "Write a dialogue between a customer and a shopkeeper about a broken umbrella.",
    "How do vaccines train the immune system?",
    "Give some tips for someone learning to play the guitar.",
    "Explain compound interest with a worked example.",
    "Write a short fairy tale about a fox who wants to fly.",
    "What are the main differences between a list and a tuple in Python?",
    "Summarize the plot of a classic adventure novel of your choice.",
    "Describe the life cycle of a butterfly.",
    "How can a small team run meetings that do not waste time?",
    "Explain why the sky is blue.",
    "Write a product description for a handmade wooden chair.",
    "What is photosynthesis, and why is it important for life on Earth?",
    "Suggest a plan for learning a new language in six months.",
    "Write a letter from a traveller to a friend back home.",
    "Explain how a refrigerator keeps food cold.",
    "List the pros and cons of working from home.",
    "Describe a thunderstorm from the point of view of a cat.",
    "How do I write a clear and useful bug report?",
    "Explain the rules of chess to a beginner.",
    "Write a short speech for a friend's birthday dinner.",
    "What happens in the body during a long run?",
    "Explain what an API is, with an everyday analogy.",
    "Tell the story of how a small village got its first library.",
    "Why do leaves change colour in autumn?",
    "Write a SQL query that finds the ten best-selling products, and explain it.",
    "Give advice to someone starting their first job.",
    "Describe the sounds and smells of a forest after rain.",
)

GENERIC_OPENINGS: tuple[str, ...] = (
    "Once upon a time",
    "The history of",
    "In this article, we",
    "Chapter 1\n\n",
    "Dear",
    "How to",
    "The following",
    "It was late in the evening when",
    "Introduction\n\n",
    "Many people",
    "def main():\n",
    "Q:",
)
