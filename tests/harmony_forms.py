"""What a harmony teacher may write after `<|start|>assistant`: well-formed completions and
every malformed form of `models.harmony.MALFORMED`, shared by the parser's tests
(test_harmony.py) and the misbehaving-teacher server (test_malformed_teacher.py)."""

A_ = "<|channel|>analysis<|message|>Reason.<|end|>"
F_ = "<|start|>assistant<|channel|>final<|message|>Answer."
# (what the teacher wrote after `<|start|>assistant`, ended_by, repair, reason): every
# malformed form of MALFORMED, and the well-formed ones beside them
GENERATED = [
    (A_ + F_ + "<|return|>", None, True, None),
    (A_ + F_, "<|return|>", True, None),  # the engine drops the EOS token
    ("<|channel|>final<|message|>Answer.<|return|>", None, True, None),  # final alone
    ("<|channel|>analysis<|message|>Cut off in the mid", "", True, None),  # max_tokens
    (A_ + F_ + " cut", "", True, None),
    (A_, "", True, None),  # cut between the messages
    (A_ + "oops" + F_ + "<|return|>", None, True, "text_outside_message"),
    (A_ + F_ + "<|return|>more", None, True, "text_outside_message"),
    (A_ + "<|start|>user<|channel|>final<|message|>A<|return|>", None, True, "unknown_role"),
    ("<|channel|>thoughts<|message|>R<|end|>" + F_, "<|return|>", True, "unknown_channel"),
    ("<|message|>no channel<|end|>" + F_, "<|return|>", True, "unknown_channel"),
    (A_ + A_.replace("<|channel|>", "<|start|>assistant<|channel|>") + F_, None, True,
     "repeated_channel"),
    (A_ + F_ + "<|end|>" + F_ + "<|return|>", None, True, "repeated_channel"),
    ("<|channel|>final<|message|>A<|end|><|start|>assistant" + A_ + F_, None, True,
     "final_before_analysis"),
    (A_ + "<|start|>assistant to=functions.f<|channel|>commentary<|message|>{}<|call|>", None,
     True, "tool_call"),
    (A_ + "<|start|>assistant<|channel|>final json<|constrain|>json<|message|>{}<|return|>",
     None, True, "tool_call"),
    (A_ + "<|start|>assistant<|channel|>commentary<|message|>Let me check.<|end|>" + F_, "",
     True, "commentary"),
    (A_, "<|return|>", True, "no_final_message"),
    (A_ + "<|return|>", None, True, "no_final_message"),
    ("<|channel|>analysis<|message|>R", "<|endoftext|>", True, "no_final_message"),
    ("", "<|return|>", True, "no_final_message"),
    (A_ + "<|start|>assistant<|channel|>fin", "", True, "header_cut_off"),
    (A_ + "<|start|>assistant", "", True, "header_cut_off"),
    (A_ + F_ + "<|end|>", None, False, "end_instead_of_return"),
    (A_ + F_ + "<|end|> trailing", None, False, "end_instead_of_return"),
    ("<|channel|>analysis<|message|>R" + F_ + "<|return|>", None, True, "unterminated_message"),
    (A_ + "<|end|>" + F_ + "<|return|>", None, True, "unexpected_token"),
    ("<|channel|>analysis<|message|>R<|message|>x<|end|>", None, True, "unexpected_token"),
]  # fmt: skip
