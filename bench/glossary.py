"""
The made-up data of docs/answers.md's staged walk-through: a small Korean medical glossary (40
terms and their definitions), written out as

    kormed/         documents of sentences that state the definitions: continued pretraining
    qa_train.jsonl  {"prompt", "completion"}: a term's definition asked, for 32 of the terms
    qa_held.jsonl   the same question for the other 8 terms, never asked in training
    exam.jsonl      a multiple-choice exam (KorMedMCQA's fields): each term's definition among four

    python bench/glossary.py --out=glossary

Every file is a function of --seed: the same call writes the same bytes.
"""
import argparse
import json
import os
import random

TERMS = {
    "고혈압": "혈압이 정상보다 높게 유지되는 상태", "저혈당": "혈액 속 포도당이 너무 낮은 상태",
    "빈혈": "적혈구나 혈색소가 부족한 상태", "폐렴": "폐에 생긴 염증", "위염": "위 점막에 생긴 염증",
    "골절": "뼈가 부러지거나 금이 간 상태", "천식": "기관지가 좁아져 숨쉬기 어려운 병",
    "당뇨병": "혈당이 높게 유지되는 만성 질환", "편두통": "머리 한쪽이 욱신거리는 두통",
    "비염": "코 점막에 생긴 염증", "결막염": "눈의 결막에 생긴 염증", "관절염": "관절에 생긴 염증",
    "장염": "장에 생긴 염증", "신부전": "콩팥이 제 기능을 못 하는 상태", "간염": "간에 생긴 염증",
    "부정맥": "심장 박동이 불규칙한 상태", "탈수": "몸속 수분이 부족한 상태",
    "발열": "체온이 정상보다 높은 상태", "기침": "기도의 이물을 내보내는 반사 작용",
    "부종": "조직에 체액이 고여 붓는 상태", "저체온증": "체온이 정상보다 낮은 상태",
    "백내장": "수정체가 흐려지는 눈병", "녹내장": "시신경이 손상되는 눈병",
    "중이염": "가운데귀에 생긴 염증", "편도염": "편도에 생긴 염증", "방광염": "방광에 생긴 염증",
    "대상포진": "신경을 따라 물집이 생기는 병", "치매": "기억과 판단이 점점 나빠지는 병",
    "뇌졸중": "뇌혈관이 막히거나 터지는 병", "협심증": "심장 근육에 피가 부족해 가슴이 아픈 병",
    "골다공증": "뼈가 약해지고 구멍이 많아지는 병", "통풍": "요산이 쌓여 관절이 아픈 병",
    "변비": "배변이 어렵거나 드문 상태", "설사": "묽은 변을 자주 보는 상태",
    "두드러기": "피부가 붉게 부풀고 가려운 상태", "습진": "피부가 가렵고 짓무르는 염증",
    "축농증": "코 곁굴에 고름이 차는 병", "갑상선염": "갑상선에 생긴 염증", "췌장염": "췌장에 생긴 염증",
    "담석증": "쓸개에 돌이 생긴 병",
}
FRAMES = ["{t}은 {d}을 말한다.", "의사는 {t}을 {d}이라고 설명했다.", "{t}이란 {d}이다.",
          "환자에게 {t}은 {d}이라고 알려 주었다.", "교과서에 따르면 {t}은 {d}이다."]
QUESTION = "질문: {t}의 뜻은?\n답:"  # the pairs' prompt; the exam's template is the same words

ap = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
ap.add_argument('--out', default='glossary', help='the folder to write (made if missing)')
ap.add_argument('--docs', type=int, default=400, help='documents in kormed/')
ap.add_argument('--sentences', type=int, default=10, help='sentences a document, each a definition')
ap.add_argument('--seed', type=int, default=0)
args = ap.parse_args()
for name in ('docs', 'sentences'):
    if getattr(args, name) < 1:
        ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
if args.sentences > len(TERMS):
    ap.error(f"--sentences must be at most {len(TERMS)} (a term once a document), "
             f"got {args.sentences}")

rng = random.Random(args.seed)
terms = sorted(TERMS)
held_out = terms[::5]  # a fifth of the terms: their questions are never trained
os.makedirs(os.path.join(args.out, 'kormed'), exist_ok=True)
for k in range(args.docs):
    with open(os.path.join(args.out, 'kormed', f'doc{k:03d}.txt'), 'w', encoding='utf-8') as f:
        f.write(' '.join(rng.choice(FRAMES).format(t=t, d=TERMS[t])
                         for t in rng.sample(terms, args.sentences)))


def write_jsonl(name, records):
    with open(os.path.join(args.out, name), 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in records)


def pair(t):
    return {'prompt': QUESTION.format(t=t), 'completion': ' ' + TERMS[t]}


write_jsonl('qa_train.jsonl', [pair(t) for t in terms if t not in held_out])
write_jsonl('qa_held.jsonl', [pair(t) for t in held_out])
exam = []
for t in terms:
    choices = [TERMS[t]] + [TERMS[x] for x in rng.sample([x for x in terms if x != t], 3)]
    rng.shuffle(choices)
    exam.append({'question': f'{t}의 뜻은?', **dict(zip('ABCD', choices)),
                 'answer': 'ABCD'[choices.index(TERMS[t])]})
write_jsonl('exam.jsonl', exam)
print(f"wrote {args.out}: {args.docs:,} documents ({args.docs * args.sentences:,} sentences) "
      f"in kormed/, {len(terms) - len(held_out)} training pairs, {len(held_out)} held out, "
      f"an exam of {len(exam)} items")
