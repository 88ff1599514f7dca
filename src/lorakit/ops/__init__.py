"""Operations on whole adapters: combining several into one (:mod:`.algebra`) and extracting one from a
fine-tuned model or reading its spectrum (:mod:`.extraction`)."""
